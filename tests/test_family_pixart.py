"""PixArt-Σ through streamsynth's loop against diffusers' PixArtSigmaPipeline, on a tiny random model: T5 with its
attention mask, a learned variance, the DDPM schedulers, prompts lower-cased, 300 tokens read."""

from __future__ import annotations

import logging

import pytest
from familykit import assert_matches_diffusers, native_parameters

from streamsynth.synth import Synthesizer, load_pipeline


@pytest.fixture(scope="module")
def pipe(tiny_family):
    return load_pipeline(tiny_family("pixart-sigma"), "cpu", "fp32")


@pytest.mark.parametrize("scheduler, steps, guidance", [(None, 4, 3.0), ("ddim", 3, 3.0), (None, 3, 1.0)])
def test_matches_diffusers(pipe, scheduler, steps, guidance, monkeypatch):
    """Its own DPM-Solver++ (PixArt-Σ's 20-step default, here fewer), DDIM, and no guidance."""
    assert pipe.transformer.config.out_channels == 2 * pipe.transformer.config.in_channels  # a learned variance
    assert_matches_diffusers(pipe, steps, guidance, scheduler, monkeypatch, alone=scheduler is None and guidance > 1)


def test_a_caption_past_300_t5_tokens_is_cut_and_said_once(pipe, caplog):
    synth = Synthesizer(pipe)
    assert [str(e) for e in synth.family.text_encoders(pipe)] == ["T5 (300 tokens)"]
    long = "a photo of tench, " + "a fish in a net " * 30
    tokens = len(pipe.tokenizer(long.strip()).input_ids)
    with caplog.at_level(logging.DEBUG, logger="streamsynth.synth.families.base"):
        synth.encode_text([long, "a photo of church"])
        synth.encode_text([long])
    cuts = [r for r in caplog.records if "was cut" in r.getMessage()]
    assert [r.levelno for r in cuts] == [logging.WARNING, logging.DEBUG]  # each worker warns once
    assert (f"PixArt-Σ reads 300 tokens of a prompt with its T5 encoder; a prompt of {tokens} tokens was cut to them"
            in cuts[0].getMessage())


def test_the_native_architecture_is_pixart_sigma_xl():
    """PixArt-Σ XL/2: a 0.6 B DiT, T5-XXL's encoder, SDXL's VAE."""
    assert native_parameters("pixart-sigma") == {"text_encoder": 4762, "vae": 84, "transformer": 611}
