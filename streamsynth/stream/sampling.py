"""What a sample id means: which caption, which prompt, which noise seed. A pure function of (run seed, sample id).

Sample ids count up from 0 forever. Pass p = id // N (N captions in the store) visits every caption exactly once,
in an order shuffled by a keyed bijection of [0, N), so the stream makes one image per real caption per pass, as the
reference recipe does, and no table of N entries is ever built or stored. With class weights (feedback-driven
sampling) the class is drawn by weight and the caption uniformly within it, both from hashes of the id.
"""

from __future__ import annotations

import bisect
import copy
from dataclasses import dataclass
from itertools import accumulate

from ..captions.store import CaptionStore
from ..prompts.templates import PromptTemplate
from ..seeding import derive_seed, keyed_permutation


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

    def locate(self, sample_id: int) -> tuple[int, int]:
        """(class index, caption index) of a sample id."""
        if sample_id < 0:
            raise ValueError(f"sample ids are non-negative, got {sample_id}")
        if self._class_weights is not None:
            u = derive_seed(self.run_seed, "class", sample_id) / 2**63
            label = min(bisect.bisect_right(self._cumulative, u), len(self._cumulative) - 1)
            while self.store.classes[label].num_captions == 0:  # only reachable through float rounding at the top
                label -= 1
            return label, derive_seed(self.run_seed, "caption", sample_id) % self.store.classes[label].num_captions
        pass_index, position = divmod(sample_id, self.num_captions)
        flat = keyed_permutation(position, self.num_captions, derive_seed(self.run_seed, "pass", pass_index))
        label = bisect.bisect_right(self._starts, flat) - 1
        return label, flat - self._starts[label]

    def __call__(self, sample_id: int) -> SampleSpec:
        label, caption_index = self.locate(sample_id)
        caption = self.store.caption(label, caption_index).text if self.template.uses_caption else ""
        seed = derive_seed(self.run_seed, "noise", sample_id)
        prompt = self.template(self.store.classes[label].name, caption, seed)
        return SampleSpec(sample_id, label, caption_index, caption, prompt, seed)
