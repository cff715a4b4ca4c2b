"""The caption store (LMDB) and the ways captions get into it."""

from .captioners import Captioner, load_captioner
from .captioning import CaptionReport, caption_images
from .importers import CaptionImportError, CaptionRecord, import_captions, read_any, write_store
from .store import Caption, CaptionStore, CaptionStoreError, CaptionStoreWriter, ClassInfo

__all__ = [
    "Caption",
    "CaptionReport",
    "Captioner",
    "CaptionImportError",
    "CaptionRecord",
    "CaptionStore",
    "CaptionStoreError",
    "CaptionStoreWriter",
    "ClassInfo",
    "caption_images",
    "import_captions",
    "load_captioner",
    "read_any",
    "write_store",
]
