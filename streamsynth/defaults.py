"""The embedded default: a tiny random-weight Stable Diffusion and ten illustrative Imagenette caption lists.

Both are built once under the cache folder (`$STREAMSYNTH_CACHE`, else `~/.cache/streamsynth`) and then loaded the
way real ones are: the model with `from_pretrained`, the captions from an LMDB caption store.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .captions.importers import import_captions
from .captions.store import CaptionStore
from .synth.tiny import cache_dir, ensure_tiny_pipeline

EMBEDDED_CAPTIONS = "imagenette_illustrative.jsonl"


def embedded_caption_source() -> Path:
    return Path(str(resources.files("streamsynth.captions") / "data" / EMBEDDED_CAPTIONS))


def embedded_captions() -> Path:
    """The caption store of the illustrative Imagenette captions, imported on first use."""
    out = cache_dir() / "imagenette-illustrative.lmdb"
    try:
        CaptionStore(out)
    except Exception:
        try:
            import_captions(embedded_caption_source(), out)
        except FileExistsError:
            CaptionStore(out)  # built meanwhile by another process; raises if it is not a valid store
    return out


def embedded_model() -> Path:
    """The tiny random-weight Stable Diffusion, saved with `save_pretrained` on first use."""
    return ensure_tiny_pipeline()
