"""The memorisation check of the digits generator: does the shipped model draw its 1,297 training digits back?

Synthetic digits come from the stream exactly as training sees them (Caption-in-Prompt prompts, the embedded
default's sampler), at the generator's native 8x8; the training part and the held-out part take the same uint8 path
(`digits_to_uint8` at 8 px). The feature space is the pixels: grey levels in [0, 1] of the 64 pixels (the three
channels are equal), compared by Euclidean distance (`streamsynth.classifier.memorisation`).
"""

from __future__ import annotations

import torch

from ..classifier.memorisation import MemorisationCheck, memorisation_check
from .data import digit_pixels, digits_to_uint8, held_out_indices, train_indices

NATIVE_SIZE = 8
FEATURE_SPACE = "pixels: the 8x8 grey levels in [0, 1], Euclidean distance"


def digit_features(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB digits (N, 3, 8, 8) → (N, 64) grey levels in [0, 1]."""
    return images.float().mean(dim=1).flatten(1) / 255


def real_digit_features(indices: range) -> torch.Tensor:
    """The digits at `indices`, through the uint8 path synthetic digits take, as `digit_features`."""
    return digit_features(digits_to_uint8(digit_pixels()[indices.start:indices.stop], NATIVE_SIZE))


def synthetic_digits(samples: int, seed: int = 0, num_inference_steps: int = 20, guidance_scale: float = 1.5,
                     prompt: str = "cip", batch_size: int = 64) -> torch.Tensor:
    """The first `samples` sample ids of the embedded default's stream under `seed`, as uint8 (N, 3, 8, 8)."""
    from ..stream.dataset import SyntheticStream
    from ..synth.config import GeneratorConfig, SynthesisConfig
    from .embedded import embedded_captions, embedded_model

    generator = GeneratorConfig(embedded_model(), image_size=NATIVE_SIZE, devices=("cpu",), batch_size=batch_size,
                                synthesis=SynthesisConfig(num_inference_steps=num_inference_steps,
                                                          guidance_scale=guidance_scale))
    stream = SyntheticStream(embedded_captions(), generator, prompt=prompt, seed=seed, batch_size=batch_size)
    return stream.make_samples(range(samples))[1]


def digits_memorisation_check(synthetic: torch.Tensor) -> MemorisationCheck:
    """The check of uint8 synthetic digits (N, 3, 8, 8) against the training part and the held-out part."""
    return memorisation_check(digit_features(synthetic), real_digit_features(held_out_indices()),
                              real_digit_features(train_indices()), FEATURE_SPACE)
