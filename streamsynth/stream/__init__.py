"""The stream: sample ids and their layout, the IterableDataset, its fault-tolerant loader, steering by the learner,
the optional WebDataset cache, the cache and real images as exactly resumable batch sources, and their mix."""

from .cache import CachedBatches, CacheOrder, cache_classes, cache_shards
from .dataset import SyntheticStream, TransformError
from .feedback import ClassFeedback
from .layout import StreamLayout
from .loader import StreamLoader, SynthesisError
from .mixing import EpochsInARow, MixedBatches, mix_weights
from .real import RealBatches
from .resumable import ResumableBatches, ResumeError
from .sampling import CaptionSampler, SampleSpec
from .selection import UncertaintySelection
from .steering import CaptionFeedback, Steering, SteeringSchedule

__all__ = [
    "CacheOrder",
    "CachedBatches",
    "CaptionFeedback",
    "CaptionSampler",
    "ClassFeedback",
    "EpochsInARow",
    "MixedBatches",
    "RealBatches",
    "ResumableBatches",
    "ResumeError",
    "SampleSpec",
    "Steering",
    "SteeringSchedule",
    "StreamLayout",
    "StreamLoader",
    "SynthesisError",
    "SyntheticStream",
    "TransformError",
    "UncertaintySelection",
    "cache_classes",
    "cache_shards",
    "mix_weights",
]
