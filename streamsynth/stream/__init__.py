"""The stream: sample ids, the IterableDataset, its restartable loader and the optional WebDataset cache."""

from .cache import cached_dataset, cache_shards
from .dataset import SyntheticStream, default_transform
from .loader import StreamLoader
from .sampling import CaptionSampler, SampleSpec, keyed_permutation

__all__ = [
    "CaptionSampler",
    "SampleSpec",
    "StreamLoader",
    "SyntheticStream",
    "cache_shards",
    "cached_dataset",
    "default_transform",
    "keyed_permutation",
]
