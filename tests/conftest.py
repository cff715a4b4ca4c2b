"""Shared fixtures: a tiny random Stable Diffusion saved to disk, and a small caption store, built once per run."""

from __future__ import annotations

import os
from pathlib import Path

# Triton kernels run on the CPU through Triton's interpreter. Triton reads this when it is imported and when a kernel
# is decorated, so it must be set before anything imports torch's or streamsynth's Triton code.
os.environ["TRITON_INTERPRET"] = "1"

import pytest

from streamsynth.captions import CaptionStore, import_captions
from streamsynth.defaults import embedded_caption_source
from streamsynth.synth import save_tiny_pipeline


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory) -> Path:
    """Tests never touch the user's cache folder."""
    path = tmp_path_factory.mktemp("streamsynth-cache")
    os.environ["STREAMSYNTH_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny SD1.5-shaped pipeline (with safety checker) written by save_pretrained; load it with from_pretrained."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def caption_store(tmp_path_factory) -> CaptionStore:
    """The ten-class illustrative Imagenette captions, imported into an LMDB store."""
    return import_captions(embedded_caption_source(), tmp_path_factory.mktemp("captions") / "captions.lmdb")
