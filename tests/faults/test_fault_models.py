"""A Stable Diffusion folder that lacks a component is named at once, in one line, before anything loads, and as a
`ModelLoadError`, which the stream's workers never retry (it used to load, then fail every synthesis call with
`OverflowError: int too big to convert`, retried four times)."""

from __future__ import annotations

import shutil

import pytest

from faultkit import assert_clean_error, run_forked
from streamsynth.cli import main as cli
from streamsynth.digits.embedded import embedded_model
from streamsynth.stream.loader import DETERMINISTIC_ERRORS
from streamsynth.synth.config import GeneratorConfig
from streamsynth.synth.loading import ModelLoadError, check_model_source

# The components the embedded model's model_index.json names, as a user's Stable Diffusion folder names them.
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@pytest.mark.parametrize("component", SD_COMPONENTS)
def test_a_model_without_a_component_is_named_before_loading(tmp_path, component):
    model = tmp_path / "model"
    shutil.copytree(embedded_model(), model)
    shutil.rmtree(model / component)
    with pytest.raises(ModelLoadError, match=f"model folder {model} has no {component}/ folder") as err:
        GeneratorConfig(str(model))
    assert isinstance(err.value, DETERMINISTIC_ERRORS)
    check_model_source(model, provided=(component,))  # a component the caller gives itself (a tiny decoder's vae)


def test_generate_names_the_missing_tokenizer_in_one_line(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(embedded_model(), model)
    for path in (model / "tokenizer").iterdir():
        path.unlink()  # an empty folder is as bad as none
    result = run_forked(lambda: cli(["generate", "--sd-model", str(model), "--out", str(tmp_path / "out"),
                                     "--no-progress"]))
    assert_clean_error(result, "has no tokenizer/ folder", status=2)
    assert not (tmp_path / "out").exists()
