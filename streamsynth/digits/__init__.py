"""The embedded default: real 8x8 handwritten digits (`data`: the fixed split, pixel-derived captions, the held-out
test set), the tiny text-to-image model trained on them (`model`, `train_generator`), and the two paths a run needs
(`embedded_model()`, `embedded_captions()`)."""

from .embedded import EMBEDDED_DEFAULT_NOTICE, embedded_captions, embedded_model

__all__ = ["EMBEDDED_DEFAULT_NOTICE", "embedded_captions", "embedded_model"]
