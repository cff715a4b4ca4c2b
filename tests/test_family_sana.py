"""Sana through streamsynth's loop against diffusers' SanaPipeline, on a tiny random model: Gemma 2 after the
pipeline's instruction prefix, a linear-attention transformer on fp32 flow-matching latents, a 32x deep-compression
autoencoder."""

from __future__ import annotations

import logging

import pytest
from familykit import assert_matches_diffusers, native_parameters

from streamsynth.synth import GeneratorConfig, ModelLoadError, SynthesisConfig, Synthesizer, load_pipeline


@pytest.fixture(scope="module")
def model(tiny_family):
    return tiny_family("sana")


@pytest.fixture(scope="module")
def pipe(model):
    return load_pipeline(model, "cpu", "fp32")


@pytest.mark.parametrize("steps, guidance", [(4, 3.0), (2, 1.0)])
def test_matches_diffusers(pipe, steps, guidance):
    assert pipe.vae_scale_factor == 32 and type(pipe.vae).__name__ == "AutoencoderDC"
    assert_matches_diffusers(pipe, steps, guidance, alone=guidance > 1)


def test_the_instruction_prefix_is_read_but_the_caption_is_what_is_counted(pipe, caplog):
    synth = Synthesizer(pipe)
    assert [str(e) for e in synth.family.text_encoders(pipe)] == ["Gemma 2 (298 tokens)"]
    text = synth.encode_text(["a photo of church"])
    assert text["prompt"].shape[1] == text["mask"].shape[1] == 300
    long = "a photo of church, " * 20  # 379 characters after lower-casing and stripping: a token each
    with caplog.at_level(logging.WARNING, logger="streamsynth.synth.families.base"):
        synth.encode_text([long])
    assert "Sana reads 298 tokens of a prompt with its Gemma 2 encoder; a prompt of 379 tokens" in caplog.text
    assert "enhanced" not in caplog.text.lower()  # the caption is quoted, not the instruction before it


def test_what_sana_has_no_part_for_is_refused_in_one_line(model, tmp_path):
    with pytest.raises(ModelLoadError, match=r"^no tiny decoder \(AutoencoderTiny\) decodes Sana's latents"):
        load_pipeline(model, "cpu", decoder=tmp_path)
    with pytest.raises(ValueError, match=r"DeepCache\) skips a UNet's deep blocks; Sana denoises with a transformer"):
        GeneratorConfig(model, synthesis=SynthesisConfig(feature_cache_interval=2))
    with pytest.raises(ModelLoadError, match="^Sana pipelines have no safety checker"):
        GeneratorConfig(model, synthesis=SynthesisConfig(safety_check=True))


def test_the_native_architecture_is_sana_1600m():
    """Sana 1600M: a 1.6 B linear DiT, Gemma-2-2B, the 0.3 B DC-AE."""
    assert native_parameters("sana") == {"text_encoder": 2614, "vae": 312, "transformer": 1604}
