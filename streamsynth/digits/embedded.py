"""The embedded default: a tiny text-to-image model trained on real 8x8 digits, and the captions of those digits.

`embedded_model()` is the generator shipped inside the package (`streamsynth/data/digits-sd`): Stable Diffusion's
component classes at a few MB, trained by `streamsynth train-digits-generator` on the training part of
the UCI handwritten digits shipped in the package. `embedded_captions()` is the caption store of those training
digits (one caption per image, from `streamsynth.digits.data.describe_digit`), built on first use under the cache folder
(`$STREAMSYNTH_CACHE`, else `~/.cache/streamsynth`). Both are loaded the way real ones are: the model with
`from_pretrained`, the captions from an LMDB caption store. The held-out real digits that score a classifier
trained on them are `streamsynth.digits.data.HeldOutDigits`.
"""

from __future__ import annotations

from pathlib import Path

from .data import ensure_digits_captions
from .model import shipped_digits_model

EMBEDDED_DEFAULT_NOTICE = (
    "embedded default: the generator is a TINY text-to-image model (Stable Diffusion's component classes, a few MB) "
    "that streamsynth trained on 1,297 real 8x8 handwritten digits (UCI), prompted with captions computed "
    "from those digits' pixels. It is not Stable Diffusion: it runs the same path in miniature. The classifier learns "
    "from its synthetic digits alone and is scored at the end on 500 held-out real digits. For a real run, give "
    "--sd-model stable-diffusion-v1-5/stable-diffusion-v1-5 (or a local diffusers folder) and --captions "
    "CAPTIONS.lmdb (made with `streamsynth caption` or `streamsynth captions import`)."
)


def embedded_captions() -> Path:
    """The caption store of the training digits (ids "0".."9", names "zero".."nine"), built on first use."""
    return ensure_digits_captions()


def embedded_model() -> Path:
    """The trained tiny digits generator shipped in the package, a diffusers folder for `from_pretrained`."""
    return shipped_digits_model()
