"""What a sample id means: which caption, which prompt, which noise seed. A pure function of (run seed, sample id).

Sample ids count up from 0 forever. Pass p = id // N (N captions in the store) visits every caption exactly once,
in an order shuffled by a keyed bijection of [0, N), so the stream makes one image per real caption per pass, as the
reference recipe does, and no table of N entries is ever built or stored. With class weights (feedback-driven
sampling) the class is drawn by weight and the caption uniformly within it, both from hashes of the id; with caption
weights (caption-level steering) the caption itself is drawn by weight, from a hash of the id.
"""

from __future__ import annotations

import bisect
import copy
from dataclasses import dataclass
from itertools import accumulate

import numpy as np

from ..captions.store import CaptionStore
from ..prompts.templates import PromptTemplate
from ..seeding import derive_seed, keyed_permutation, keyed_permutation_inverse


@dataclass(frozen=True)
class SampleSpec:
    """Everything that defines one synthetic sample; the image is a pure function of (prompt, seed)."""

    sample_id: int
    label: int
    caption_index: int
    caption: str
    prompt: str
    seed: int


class CaptionSampler:
    """Maps sample ids to `SampleSpec`s over a caption store; picklable, cheap to call in any process."""

    def __init__(self, store: CaptionStore, template: PromptTemplate, run_seed: int = 0):
        self.store = store
        self.template = template
        self.run_seed = run_seed
        counts = [c.num_captions for c in store.classes]
        if sum(counts) == 0:
            raise ValueError(f"caption store {store.path} holds no captions")
        self._starts = [0, *accumulate(counts)]  # class c owns flat indices [starts[c], starts[c+1])
        self.num_captions = self._starts[-1]
        self._class_weights: list[float] | None = None
        self._cumulative: list[float] = []
        self._caption_cumulative: np.ndarray | None = None  # over flat caption indices, when captions are weighted

    @property
    def class_weights(self) -> list[float] | None:
        return self._class_weights

    @class_weights.setter
    def class_weights(self, weights: list[float] | None) -> None:
        """None: every caption once per pass. A list: classes drawn with these weights, captions uniformly."""
        if weights is not None:
            if len(weights) != self.store.num_classes or min(weights) < 0:
                raise ValueError(f"expected {self.store.num_classes} non-negative class weights, got {len(weights)}")
            counts = [c.num_captions for c in self.store.classes]
            weights = [w if n else 0.0 for w, n in zip(weights, counts)]  # a class with no caption cannot be drawn
            total = sum(weights)
            if total <= 0:
                raise ValueError("class weights put no mass on any class that has captions")
            self._cumulative = list(accumulate(w / total for w in weights))
        self._class_weights = weights

    def weighted(self, weights: list[float] | None) -> "CaptionSampler":
        """A copy of this sampler that draws classes with `weights` (None: every caption once per pass)."""
        sampler = copy.copy(self)
        sampler.class_weights = weights
        return sampler

    def caption_weighted(self, weights: np.ndarray | None) -> "CaptionSampler":
        """A copy of this sampler that draws each sample's caption with `weights`, one non-negative weight per flat
        caption index (class by class, in store order; None: every caption once per pass)."""
        sampler = copy.copy(self)
        if weights is None:
            sampler._caption_cumulative = None
            return sampler
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (self.num_captions,) or not np.isfinite(weights).all() or weights.min() < 0:
            raise ValueError(f"expected {self.num_captions} finite non-negative caption weights, got shape "
                             f"{weights.shape}")
        cumulative = np.cumsum(weights)
        if cumulative[-1] <= 0:
            raise ValueError("caption weights put no mass on any caption")
        sampler._caption_cumulative = cumulative / cumulative[-1]
        return sampler

    def candidate_pool(self) -> "CaptionSampler":
        """An unweighted sampler over the same captions whose ids are a separate, keyed space: candidate id i of it
        is another sample (class, caption, noise) than sample id i of this one, so a pool of candidates never
        repeats a sample of the stream."""
        sampler = self.weighted(None).caption_weighted(None)
        sampler.run_seed = derive_seed(self.run_seed, "candidate pool")
        return sampler

    def flat_index(self, label: int, caption_index: int) -> int:
        """The index of caption `caption_index` of class `label` among all captions, class by class."""
        return self._starts[label] + caption_index

    def locate(self, sample_id: int) -> tuple[int, int]:
        """(class index, caption index) of a sample id."""
        if sample_id < 0:
            raise ValueError(f"sample ids are non-negative, got {sample_id}")
        if self._caption_cumulative is not None:
            u = derive_seed(self.run_seed, "weighted caption", sample_id) / 2**63
            flat = min(int(np.searchsorted(self._caption_cumulative, u, side="right")), self.num_captions - 1)
            label = bisect.bisect_right(self._starts, flat) - 1
            return label, flat - self._starts[label]
        if self._class_weights is not None:
            u = derive_seed(self.run_seed, "class", sample_id) / 2**63
            label = min(bisect.bisect_right(self._cumulative, u), len(self._cumulative) - 1)
            while self.store.classes[label].num_captions == 0:  # only reachable through float rounding at the top
                label -= 1
            return label, derive_seed(self.run_seed, "caption", sample_id) % self.store.classes[label].num_captions
        pass_index, position = divmod(sample_id, self.num_captions)
        flat = keyed_permutation(position, self.num_captions, self._pass_key(pass_index))
        label = bisect.bisect_right(self._starts, flat) - 1
        return label, flat - self._starts[label]

    def _pass_key(self, pass_index: int) -> int:
        """The key of pass `pass_index`'s shuffle of the captions (`locate` and `class_sample_ids` must agree)."""
        return derive_seed(self.run_seed, "pass", pass_index)

    def class_sample_ids(self, label: int, count: int) -> list[int]:
        """The first `count` sample ids of the unweighted sequence whose class is `label`, in increasing order.

        Pass p visits each of the class's n captions once, so these are the class's ids of passes 0 .. count // n - 1
        and the count % n smallest of the next pass: every caption of the class serves count // n or count // n + 1
        of them. They are found by inverting the pass permutations, at a cost of O(count + n) whatever the size of
        the store. A class without captions has no sample ids.
        """
        first, end = self._starts[label], self._starts[label + 1]
        n = end - first
        if n == 0 or count <= 0:
            return []
        full, rest = divmod(count, n)

        def pass_ids(p: int) -> list[int]:
            key = self._pass_key(p)
            return sorted(p * self.num_captions + keyed_permutation_inverse(flat, self.num_captions, key)
                          for flat in range(first, end))

        ids = [i for p in range(full) for i in pass_ids(p)]
        return ids + (pass_ids(full)[:rest] if rest else [])

    def __call__(self, sample_id: int) -> SampleSpec:
        label, caption_index = self.locate(sample_id)
        caption = self.store.caption(label, caption_index).text if self.template.uses_caption else ""
        seed = derive_seed(self.run_seed, "noise", sample_id)
        prompt = self.template(self.store.classes[label].name, caption, seed)
        return SampleSpec(sample_id, label, caption_index, caption, prompt, seed)
