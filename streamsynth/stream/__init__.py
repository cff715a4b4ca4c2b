"""The stream: sample ids, the IterableDataset and its loader."""

from .dataset import SyntheticStream, default_transform
from .sampling import CaptionSampler, SampleSpec, keyed_permutation

__all__ = ["CaptionSampler", "SampleSpec", "SyntheticStream", "default_transform", "keyed_permutation"]
