"""Indexing WebDataset shards (uncompressed tar files) from their headers, tolerating damage.

Both readers of shards use it: captioning (`captions/images.py`, shards of real images) and training from the cache
(`stream/cache.py`). A shard is read by its tar headers only, with seeks over the member data, so indexing is cheap
and every sample becomes byte ranges that any process can read directly.

Members are grouped into samples by webdataset's own rule (`tariterators.group_by_keys`): `{key}.{field}` names,
consecutive members with the same key form one sample, a repeated field starts a new one. A damaged shard (random
bytes, zero bytes, truncated, a header that does not parse) is not an exception here: `index_shard` keeps the
samples that are whole and says, in `problem`, why the rest is missing. The caller decides what to do with it.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field


@dataclass
class ShardSample:
    key: str
    fields: dict[str, tuple[int, int]]  # field (lower case) → (offset of the data in the shard, size)


@dataclass
class ShardIndex:
    path: str
    samples: list[ShardSample] = field(default_factory=list)
    problem: str | None = None  # why (part of) the shard could not be indexed; None for a whole, healthy shard
    incomplete: list[str] = field(default_factory=list)  # keys of samples that lack a required field

    def read(self, sample: ShardSample, name: str) -> bytes:
        """The bytes of one field of a sample (raises OSError if the file changed under us)."""
        offset, size = sample.fields[name]
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.path}: {sample.key}.{name} ends early ({len(data)} of {size} bytes): the shard "
                          "was truncated or rewritten while it was read")
        return data


def index_shard(path: str | os.PathLike, required: tuple[str, ...] = ()) -> ShardIndex:
    """The whole samples of a shard, from its tar headers. A sample that lacks one of the `required` fields (an entry
    "jpg|png" asks for either) is not in `samples` but in `incomplete`."""
    from webdataset.tariterators import base_plus_ext

    path = str(path)
    index = ShardIndex(path)
    try:
        size = os.path.getsize(path)
    except OSError as err:
        index.problem = f"cannot read the file ({err.strerror or err})"
        return index
    if size == 0:
        index.problem = "empty file (0 bytes)"
        return index
    groups: list[tuple[str, dict[str, tuple[int, int]]]] = []
    try:
        # Mode "r:" reads an uncompressed tar with seeks: only the headers are read, the data is seeked over.
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                prefix, suffix = base_plus_ext(member.name)
                if member.offset_data + member.size > size:
                    index.problem = (f"truncated: member {member.name} needs {member.offset_data + member.size} "
                                     f"bytes, the file has {size}")
                    if groups and groups[-1][0] == prefix:
                        groups.pop()  # that sample lost this member (and any after it)
                    break
                if prefix is None:
                    continue
                suffix = suffix.lower()
                if not groups or groups[-1][0] != prefix or suffix in groups[-1][1]:
                    groups.append((prefix, {}))
                groups[-1][1][suffix] = (member.offset_data, member.size)
            else:
                # tarfile takes a file cut at a header boundary for a shorter archive: a whole tar ends with two
                # zero blocks after its last member, a cut one does not.
                if size - tar.offset < 2 * tarfile.BLOCKSIZE:
                    index.problem = "truncated: the file ends without tar's end-of-archive blocks"
    except (tarfile.ReadError, OSError, EOFError, ValueError) as err:  # a header tarfile cannot parse, an I/O error
        what = str(err) if isinstance(err, tarfile.ReadError) else f"{type(err).__name__}: {err}"
        index.problem = (f"not an uncompressed tar file ({what})" if not groups
                         else f"damaged after {len(groups)} samples ({what})")
        if groups:
            groups.pop()  # the sample being read when the damage was found may lack members that came after it
    for key, fields in groups:
        missing = [name for name in required if not _has(fields, name)]
        if missing:
            index.incomplete.append(key)
        else:
            index.samples.append(ShardSample(key, fields))
    return index


def _has(fields: dict, name: str) -> bool:
    # "a|b": any of the alternatives
    return any(alternative in fields for alternative in name.split("|"))
