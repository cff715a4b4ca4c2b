"""The optional WebDataset cache: keep what the stream made, train from it later. Its folder (`folder`), writer
(`writer`), reading order (`order`) and reader (`reader`) are apart.

Each generation group becomes one tar shard of (png, cls, json) samples, written under a hidden temporary name and
renamed when complete: a reader (plain `webdataset` included) never sees a partial shard, and a killed writer
leaves only a hidden `.tmp` file, named by its host and process (`streamsynth generate --resume` removes those of
its shards). A shard is named by its run seed and
first sample id, so a restarted or resumed run finds the shards it already wrote and does not write them again.

Training from the cache reads it in a seeded order that is a pure function of (seed, position), so a run resumes
exactly from a batch count (`CachedBatches`): see `CacheOrder` and `CacheStream`.

Damage (see docs/reliability.md): shards are indexed from their tar headers (`streamsynth.shards`). A shard that is
not a tar, empty or truncated is named in a warning when training starts and only its whole samples are used; a
sample whose image does not decode (streamsynth's one decoding policy, `streamsynth.imagefiles`) or that cannot be
read any more is left out of its batch, with a warning naming the shard and sample. A batch with no usable sample at
all, or a cache with none, is a `CacheReadError` naming the shards.
"""

from .folder import CLASSES_FILE, CacheReadError, cache_classes, cache_shards, shard_name, write_cache_classes
from .order import CacheOrder, shard_index, shard_sample_count
from .reader import CachedBatches, CacheStream, read_members, read_metadata
from .writer import write_group

__all__ = ["CLASSES_FILE", "CacheOrder", "CacheReadError", "CacheStream", "CachedBatches", "cache_classes",
           "cache_shards", "read_members", "read_metadata", "shard_index", "shard_name", "shard_sample_count",
           "write_cache_classes", "write_group"]
