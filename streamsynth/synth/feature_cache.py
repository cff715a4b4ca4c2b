"""DeepCache-style feature caching across denoising steps (Ma et al., "DeepCache", CVPR 2024).

A UNet's deep features change slowly from one denoising step to the next while its shallow ones follow the input.
So on a "full" step the whole UNet runs and the feature it feeds into its last (shallowest) up block is kept; on the
steps in between only the shallow path runs - `conv_in`, the first down block, the last up block fed with the kept
deep feature, `conv_norm_out`/`conv_out` - which on SD1.5 skips most of the UNet's work (about 2.3x reported).

Design: diffusers' own `UNet2DConditionModel.forward` runs on every step; nothing of it is copied, so its handling of
timestep embedding, attention masks, upsample sizes and new diffusers releases stays its own. On a shallow step the
deep blocks (`down_blocks[1:]`, `mid_block`, `up_blocks[:-1]`) get an instance-level `forward` for the duration of
the call (module hooks cannot skip a module, only observe or rewrite its inputs and outputs). The modules themselves
stay in place, so the attributes the UNet forward reads from them (`has_cross_attention`, `resnets` for how many
residuals an up block takes) and the state dict are untouched, and nothing remains patched between calls. A skipped
down block answers with its input and a residual tuple of the length it gave on the last full step: the residuals
are only counted by the UNet forward and then consumed by the skipped up blocks, while the last up block takes the
fresh residuals of `conv_in` and the first down block. A skipped up block answers with the kept deep feature (only
the last of them reaches the last up block). On a full step forward hooks record that feature and those lengths.

When the cache is reused: step `i` is full when `i % interval == 0`, or when the cache holds no feature for the rows
this call has. Under limited-interval guidance the UNet batch switches between 2B rows (unconditional +
conditional) and B rows; the first step after a switch is forced full rather than reusing the conditional half of a
2B feature, which would tie the cache to the sampler's row layout for the one step that switch saves. Every cached
row comes from the same row of the last full call, so an image still depends on its (prompt, seed) alone.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from torch import nn


class FeatureCache:
    """Runs a diffusers `UNet2DConditionModel` fully or along its shallow path, step by step, and counts the rows.

    `full_rows` and `shallow_rows` count UNet rows (images x guidance branches) evaluated fully and shallowly since
    the cache was made: a benchmark divides them by the number of images for UNet evaluations per image. With
    `interval == 1` every step is full and the UNet is never touched; only the counters move.

    Made for the eager UNet: with the fast path's `compile_unet` or `cuda_graphs` the hooks and swapped forwards would
    meet torch.compile's guards (and CUDA graphs reuse their output memory, the kept feature's), so `GeneratorConfig`
    refuses that combination.
    """

    def __init__(self, unet: nn.Module, interval: int = 1):
        if interval < 1:
            raise ValueError(f"feature_cache_interval must be at least 1 (1 switches the cache off), got {interval}")
        if interval > 1 and len(unet.up_blocks) < 2:
            raise ValueError("feature_cache_interval > 1 needs a UNet with at least two up blocks (a deep path to "
                             f"skip), this one has {len(unet.up_blocks)}")
        self.unet = unet
        self.interval = interval
        self.full_rows = 0
        self.shallow_rows = 0
        self._deep: torch.Tensor | None = None
        self._residual_counts: list[int] = []

    def reusable(self, step: int, rows: int) -> bool:
        """Whether step `step` of a sampling run, with `rows` UNet rows, may run only the shallow path."""
        return (self.interval > 1 and step % self.interval != 0
                and self._deep is not None and self._deep.shape[0] == rows)

    @contextmanager
    def step(self, step: int, rows: int) -> Iterator[None]:
        """The UNet call made inside is step `step` of a sampling run: full (refilling the cache) or shallow."""
        if self.reusable(step, rows):
            self.shallow_rows += rows
            with self._replaying():
                yield
        else:
            self.full_rows += rows
            if self.interval == 1:
                yield
            else:
                with self._recording():
                    yield

    def clear(self) -> None:
        """Drops the kept deep feature (its memory); the next step refills it."""
        self._deep = None

    def _deep_down_blocks(self) -> list[nn.Module]:
        return list(self.unet.down_blocks[1:])

    @contextmanager
    def _recording(self) -> Iterator[None]:
        # Committed only once the call has gone through, so a failed call leaves no half-filled cache behind.
        self._deep = None
        counts: list[int] = []
        kept: list[torch.Tensor] = []
        handles = [block.register_forward_hook(lambda module, args, output: counts.append(len(output[1])))
                   for block in self._deep_down_blocks()]
        handles.append(self.unet.up_blocks[-2].register_forward_hook(lambda module, args, output: kept.append(output)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        self._deep, self._residual_counts = kept[-1], counts

    @contextmanager
    def _replaying(self) -> Iterator[None]:
        deep = self._deep
        stand_ins = [(block, _skipped_down_block(count))
                     for block, count in zip(self._deep_down_blocks(), self._residual_counts, strict=True)]
        if self.unet.mid_block is not None:
            stand_ins.append((self.unet.mid_block, _skipped_mid_block))
        stand_ins += [(block, lambda *args, **kwargs: deep) for block in self.unet.up_blocks[:-1]]
        with ExitStack() as stack:
            for module, forward in stand_ins:
                stack.enter_context(_forward_replaced(module, forward))
            yield


def _skipped_down_block(count: int):
    def forward(hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        return hidden_states, (hidden_states,) * count
    return forward


def _skipped_mid_block(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return hidden_states


@contextmanager
def _forward_replaced(module: nn.Module, forward) -> Iterator[None]:
    # Restores what was there before, so a forward another library set on the instance (accelerate's offload hooks
    # do) survives the shallow step.
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous
