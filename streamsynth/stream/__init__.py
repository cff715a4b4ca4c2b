"""The stream: sample ids, the IterableDataset, its restartable loader, the optional WebDataset cache, and the cache
and real images as exactly resumable batch sources."""

from .cache import CachedBatches, CacheOrder, cache_shards
from .dataset import SyntheticStream, default_transform
from .loader import StreamLoader
from .real import RealBatches
from .resumable import ResumableBatches, ResumeError
from .sampling import CaptionSampler, SampleSpec, keyed_permutation

__all__ = [
    "CacheOrder",
    "CachedBatches",
    "CaptionSampler",
    "RealBatches",
    "ResumableBatches",
    "ResumeError",
    "SampleSpec",
    "StreamLoader",
    "SyntheticStream",
    "cache_shards",
    "default_transform",
    "keyed_permutation",
]
