"""Writing train.py's checkpoints so that none is ever lost, and reading one back for `--resume`, checked.

- `save_checkpoint(path, state)` writes through streamsynth's one write path (`safeio.atomic_write`): the new
  checkpoint goes to a hidden temporary file, is flushed to the disk and renamed over the old one, so the previous
  checkpoint survives a crash, kill -9 or a full disk at any point of the write. A full disk is a `DiskFullError`
  that says the previous checkpoint is intact and how much room the next one needs; the partial file is removed.
- `check_checkpoint_room(path, model, optimizer)` runs before training: while a checkpoint replaces the previous one
  both are on disk, so the run needs room for two; if it does not have it, it says so now, with the amount, rather
  than after hours of training (or, on `--resume`, at the first checkpoint).
- `load_resume_checkpoint(path, arch, image_size, class_ids, ...)` refuses, with one `CheckpointError` and a
  one-line message, a checkpoint that is empty, truncated, not a checkpoint, unsafe to unpickle, lacks fields, or
  was trained with another architecture, image size or set of classes; with `model`, `optimizer` and `scaler` it
  also loads their states, summarising a mismatch instead of listing hundreds of parameter names.

Loading is always `torch.load(weights_only=True)`: a checkpoint holding arbitrary Python objects (a malicious
pickle) is refused, never executed.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import StreamsynthError
from ..safeio import DiskFullError, atomic_write, check_file_size_limit, free_bytes, human_bytes, temporary_path

log = logging.getLogger(__name__)

# What a checkpoint must hold for train.py to resume from it.
RESUME_FIELDS = ("model", "arch", "num_classes", "class_ids", "step", "optimizer", "loaders")
# Pickle framing, zip directory and small values on top of the tensors' bytes.
_OVERHEAD_BYTES = 1 << 20


class CheckpointError(StreamsynthError, ValueError):
    """A checkpoint cannot be loaded or does not fit this run; the message names it, the difference and the fix."""


# ---------------------------------------------------------------- writing


def state_bytes(state) -> int:
    """The bytes of the tensors in a (nested) state, each storage counted once: what `torch.save` writes, less a
    little framing."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def walk(value) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(state)
    return total


def _leftovers(path: Path) -> list[Path]:
    """Temporary files of checkpoint writes that were killed: this version's and the visible one of older ones."""
    return [p for p in (temporary_path(path), path.with_name(path.name + ".tmp")) if p.exists()]


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write `state` to `path` all or nothing; the previous checkpoint stays intact until the new one is complete.

    A full disk raises `DiskFullError` with the room needed; anything else re-raises as it is. Either way no
    partial file is left behind."""
    path = Path(path)
    for leftover in _leftovers(path):
        leftover.unlink(missing_ok=True)  # a killed write's partial file: its space is needed now
    needed = state_bytes(state) + _OVERHEAD_BYTES
    kept = (f"the previous checkpoint {path} is intact" if path.exists()
            else "no earlier checkpoint exists")
    return atomic_write(
        path, lambda f: torch.save(state, f), what="checkpoint", kept=kept,
        fix=f"free at least {human_bytes(needed)} there (a checkpoint of this run) and continue with --resume",
    )


def estimate_checkpoint_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """About the size of a checkpoint of `model` (and `optimizer`, whose per-parameter buffers exist only after
    its first step: one for SGD with momentum, two for Adam-like optimizers, counted ahead)."""
    total = state_bytes(model.state_dict()) + _OVERHEAD_BYTES
    if optimizer is not None:
        if optimizer.state:
            total += state_bytes(optimizer.state_dict())
        else:
            for group in optimizer.param_groups:
                slots = 2 if "betas" in group else (1 if group.get("momentum", 0) else 0)
                total += slots * sum(p.numel() * p.element_size() for p in group["params"])
    return total


def check_checkpoint_room(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
    extra_bytes: int = 0,
) -> int:
    """Before training: raise `DiskFullError` unless the folder of `path` has room for the checkpoints of this run
    (two at a time: the previous one stays until the next is complete), counting what is there already, and a
    checkpoint is below the process's file-size limit (`FileSizeLimitError`); returns the estimated size of one
    checkpoint. `extra_bytes`: anything else the run will write there (logs, results)."""
    path = Path(path)
    size = estimate_checkpoint_bytes(model, optimizer)
    check_file_size_limit(size, f"a checkpoint ({path})")
    reusable = sum(p.stat().st_size for p in [path, *_leftovers(path)] if p.exists())
    needed = 2 * size + extra_bytes - reusable
    free = free_bytes(path.parent)
    if free is not None and free < needed:
        raise DiskFullError(
            f"not enough space for checkpoints in {path.parent}: {human_bytes(free)} free, this run needs "
            f"{human_bytes(needed)} more (a checkpoint is about {human_bytes(size)}, and the previous one stays until "
            "the next is complete); free some space or choose another --out"
        )
    return size


# ---------------------------------------------------------------- reading


def read_checkpoint(path: str | os.PathLike, map_location="cpu", error: type[Exception] = CheckpointError) -> dict:
    """`torch.load(path, weights_only=True)` with every way it can fail said in one line (raised as `error`)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except OSError as err:
        raise error(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    if size == 0:
        raise error(f"checkpoint {path} is empty (0 bytes): its write never completed; restore a copy, or remove it "
                    "and start anew")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err) or (not zipfile.is_zipfile(path) and _starts_like_a_pickle(path)):
            raise error(f"refusing to load {path}: it holds Python objects other than tensors and plain values, "
                        "which could run code when unpickled; streamsynth loads weights-only checkpoints "
                        "(write it with train.py, or re-save the state_dict)") from None
        raise error(f"checkpoint {path} is damaged: not a torch checkpoint of tensors and plain values (truncated, "
                    "overwritten or another kind of file); restore a copy, or remove it and start anew") from None
    except OSError as err:
        raise error(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    except Exception as err:  # torch reports a truncated or foreign file as RuntimeError, EOFError, ValueError, ...
        what = ("truncated or not a torch checkpoint" if not zipfile.is_zipfile(path)
                else "its contents do not load")
        raise error(f"checkpoint {path} is damaged: {what} ({type(err).__name__}: {_first_line(err)}); restore a "
                    "copy, or remove it and start anew") from None
    if not isinstance(state, dict):
        raise error(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def _starts_like_a_pickle(path: Path) -> bool:
    """A bare pickle (protocol 2 to 5) rather than torch's zip format or random bytes."""
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def describe_state_mismatch(model: nn.Module, state_dict) -> str | None:
    """How a state dict differs from a model's, in one short line (None if they fit); for a checkpoint of another
    architecture this replaces PyTorch's list of every missing and unexpected parameter name."""
    if not isinstance(state_dict, dict):
        return f"the weights are a {type(state_dict).__name__}, not a state dict"
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and isinstance(state_dict[k], torch.Tensor)
              and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} of its parameters are missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} are not the model's (e.g. {unexpected[0]})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} have another shape (e.g. {k}: {tuple(state_dict[k].shape)} in the checkpoint, "
                     f"{tuple(own[k].shape)} in the model)")
    return ", ".join(parts)


def _class_difference(saved: Sequence[str], now: Sequence[str]) -> str:
    if len(saved) != len(now):
        return f"it has {len(saved)} classes, this run's data {len(now)}"
    i = next(i for i, (a, b) in enumerate(zip(saved, now)) if a != b)
    return f"label {i} is {saved[i]!r} in the checkpoint and {now[i]!r} in this run's data"


def load_resume_checkpoint(
    path: str | os.PathLike,
    arch: str,
    image_size: int | None,
    class_ids: Sequence[str],
    *,
    map_location="cpu",
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scaler=None,
    required: Sequence[str] = RESUME_FIELDS,
) -> dict:
    """The checkpoint at `path`, checked against this run (`--model`, `--image-size`, the data's classes), with the
    states of `model`, `optimizer` and `scaler` (those given) loaded from it. Any problem is a `CheckpointError`
    whose one-line message names the checkpoint, the difference and the fix."""
    path = Path(path)
    fix = "resume with the settings it was written with, or start a new run in another --out"
    state = read_checkpoint(path, map_location)
    missing = [name for name in required if name not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks the fields {missing} (it has {sorted(state)[:8]}): it was not "
                              "written by this train.py; start a new run in another --out")
    if state["arch"] != arch:
        raise CheckpointError(f"checkpoint {path} is of a {state['arch']!r} classifier, this run asks for --model "
                              f"{arch!r}; {fix}")
    saved_size = state.get("image_size")
    if saved_size is None:
        log.warning("%s does not record its image size; resuming at --image-size %s", path, image_size)
    elif image_size is not None and saved_size != image_size:
        raise CheckpointError(f"checkpoint {path} was trained at --image-size {saved_size}, this run asks for "
                              f"{image_size}; {fix}")
    if list(state["class_ids"]) != list(class_ids):
        raise CheckpointError(f"checkpoint {path} was trained on other classes than this run's data "
                              f"({_class_difference(list(state['class_ids']), list(class_ids))}); resume with the "
                              "same caption store / data, or start a new run in another --out")
    if model is not None:
        mismatch = describe_state_mismatch(model, state["model"])
        if mismatch:
            raise CheckpointError(f"checkpoint {path}: its weights do not fit this {arch} with {len(class_ids)} "
                                  f"classes: {mismatch}")
        try:
            model.load_state_dict(state["model"])
        except (RuntimeError, ValueError, TypeError) as err:
            raise CheckpointError(f"checkpoint {path}: its weights do not load ({_first_line(err)})") from None
    if optimizer is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"checkpoint {path}: its optimizer state does not fit this run's optimizer "
                                  f"({_first_line(err)}); {fix}") from None
    if scaler is not None and "scaler" in state:
        try:
            scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"checkpoint {path}: its gradient scaler state does not load "
                                  f"({_first_line(err)})") from None
    return state
