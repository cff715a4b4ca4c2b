"""Prompt strategies: built-ins, user templates, and the seed-chosen template sets."""

from __future__ import annotations

import pytest

from streamsynth.prompts import PHOTO_TEMPLATES, PromptTemplate, prompt_template
from streamsynth.stream import CaptionSampler


def test_builtin_strategies_render():
    assert prompt_template("cip")("tench", " a fish on grass ") == "a photo of tench, a fish on grass"
    assert prompt_template("basic")("tench", "ignored") == "a photo of tench"
    assert prompt_template("name")("tench", "ignored") == "tench"
    assert prompt_template("a sketch of {name}: {caption}")("tench", "a fish") == "a sketch of tench: a fish"


def test_caption_use_is_known_per_strategy():
    assert prompt_template("cip").uses_caption
    assert not prompt_template("name").uses_caption
    assert not prompt_template("clip").uses_caption
    assert PromptTemplate(("{name}", "{name}, {caption}")).uses_caption


@pytest.mark.parametrize("bad", ["a photo", "no name field {caption}", "{name} {other}", "{name} {0}"])
def test_bad_templates_are_refused(bad):
    with pytest.raises(ValueError):
        prompt_template(bad)


def test_clip_templates_are_a_deterministic_function_of_the_seed():
    strategy = prompt_template("clip")
    seeds = range(400)
    first = [strategy("tench", seed=s) for s in seeds]
    again = [prompt_template("clip")("tench", seed=s) for s in seeds]
    assert first == again
    used = {strategy.choose(s) for s in seeds}
    # 400 draws over 12 templates miss one with probability about 12 * (11/12)**400, i.e. never.
    assert used == set(PHOTO_TEMPLATES)


def test_single_template_ignores_the_seed():
    strategy = prompt_template("cip")
    assert {strategy("tench", "a fish", seed=s) for s in range(50)} == {"a photo of tench, a fish"}


def test_sampler_prompts_follow_the_sample_seed(caption_store):
    clip = prompt_template("clip")
    sampler = CaptionSampler(caption_store, clip, run_seed=3)
    specs = [sampler(i) for i in range(60)]
    assert specs == [CaptionSampler(caption_store, clip, run_seed=3)(i) for i in range(60)]
    for spec in specs:
        assert spec.prompt == clip(caption_store.classes[spec.label].name, seed=spec.seed)
    assert len({spec.prompt.replace(caption_store.classes[spec.label].name, "") for spec in specs}) > 5
    other_run = [CaptionSampler(caption_store, clip, run_seed=4)(i).prompt for i in range(60)]
    assert other_run != [spec.prompt for spec in specs]
