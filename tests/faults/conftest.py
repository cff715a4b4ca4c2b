"""Fixtures of the fault-injection suite (see docs/reliability.md); tests/conftest.py prints its count of cases."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # faultkit, whatever pytest's import mode


class StubPreprocessor:
    """Stands in for a model's image processor: the mean colour of the image, as three floats."""

    size = 16

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(0) / 255)


class StubCaptioner:
    """A deterministic captioner (the caption is a function of the image alone), so the suite tests the pipeline's
    faults, not a model. It quacks like `streamsynth.captions.captioners.Captioner`."""

    name = "stub-captioner"
    settings = {"stub": True}
    device = torch.device("cpu")
    preprocessor = StubPreprocessor()

    def caption(self, pixels: torch.Tensor) -> list[str]:
        return [f"a picture of colour {' '.join(str(round(float(v) * 255)) for v in p)}" for p in pixels]


@pytest.fixture
def stub_captioner(monkeypatch) -> StubCaptioner:
    """The stub, also what `streamsynth caption --captioner anything` loads."""
    captioner = StubCaptioner()
    monkeypatch.setattr("streamsynth.captions.captioners.load_captioner", lambda *args, **kwargs: captioner)
    return captioner


def png(seed: int, size: tuple[int, int] = (12, 10)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def image_tree():
    """A writer of an ImageFolder tree from {relative path: bytes, or an int seed for a small random PNG}."""
    def write(root: Path, files: dict[str, bytes | int]) -> Path:
        for relative, data in files.items():
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png(data) if isinstance(data, int) else data)
        return root

    return write
