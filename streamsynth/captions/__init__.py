"""The caption store (LMDB) and the ways captions get into it."""

from .importers import CaptionImportError, CaptionRecord, import_captions, read_any, write_store
from .store import Caption, CaptionStore, CaptionStoreError, CaptionStoreWriter, ClassInfo

__all__ = [
    "Caption",
    "CaptionImportError",
    "CaptionRecord",
    "CaptionStore",
    "CaptionStoreError",
    "CaptionStoreWriter",
    "ClassInfo",
    "import_captions",
    "read_any",
    "write_store",
]
