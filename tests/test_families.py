"""Every model family behind the same stream: the registry finds each family's module, an unsupported checkpoint is
refused in one line, and a sample of any family is a pure function of (run seed, sample id) through the stream.

Each family's equality with its diffusers pipeline is its own test module (tests/test_family_*.py; SD1.x/2.x's are
tests/test_synth.py and tests/test_distilled.py). A 2-rank run resumed on a non-SD1 family, and the fast path on a
transformer family, are SD3's (tests/test_family_sd3.py).
"""

from __future__ import annotations

import pkgutil
from pathlib import Path

import pytest
import torch

from streamsynth.synth import GeneratorConfig, ModelLoadError, SynthesisConfig, load_pipeline
from streamsynth.synth import families
from streamsynth.synth.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
KEYS = sorted({family.key for family in FAMILIES.values()})


def test_every_module_of_the_package_is_a_registered_family():
    """Adding a family is adding its module: the registry walks the package for `FAMILY`."""
    modules = {info.name for info in pkgutil.iter_modules(families.__path__)} - {"base"}
    registered = {type(family).__module__.rsplit(".", 1)[1] for family in FAMILIES.values()}
    assert registered == modules and len(KEYS) == len(modules)
    import diffusers

    for class_name in FAMILIES:
        assert hasattr(diffusers, class_name), class_name  # a pipeline class diffusers has


def test_every_family_has_its_row_in_the_docs_table():
    table = (ROOT / "docs" / "families.md").read_text().split("## The families", 1)[1].split("\n## ", 1)[0]
    names = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    assert sorted(names[2:]) == sorted({f.name for f in FAMILIES.values()})  # after the header and its rule


def test_an_unsupported_pipeline_is_refused_in_one_line_naming_the_supported_ones(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    for make in (lambda: GeneratorConfig(tmp_path), lambda: load_pipeline(tmp_path)):
        with pytest.raises(ModelLoadError) as refused:
            make()
        message = str(refused.value)
        assert "\n" not in message and message.startswith(f"{tmp_path} is a FluxPipeline, which streamsynth does not")
        assert all(f"{family.name} ({name})" in message for name, family in FAMILIES.items())


@pytest.mark.parametrize("key", KEYS)
def test_through_the_stream_a_sample_is_a_function_of_its_id(key, tiny_family, caption_store):
    """The stream's generator call (`Synthesizer.from_config`, then `generate_uint8`) on each family: the same
    sample ids give the same images in any order and batching; distinct ids differ."""
    from streamsynth.prompts import prompt_template
    from streamsynth.stream.groups import GroupMaker
    from streamsynth.stream.sampling import CaptionSampler

    generator = GeneratorConfig(tiny_family(key), synthesis=SynthesisConfig(num_inference_steps=2), image_size=16,
                                devices=("cpu",), dtype="fp32", batch_size=3)
    maker = GroupMaker(CaptionSampler(caption_store, prompt_template("cip"), run_seed=5), generator,
                       transform=lambda image: image, seed=5)
    specs, images = maker.make_samples([0, 1, 2, 3])
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 16, 16)
    assert type(maker.synthesizer().pipe).__name__ in FAMILIES[type(maker.synthesizer().pipe).__name__].pipeline_classes
    maker.generator = GeneratorConfig(**{**vars(generator), "batch_size": 1})
    _, again = maker.make_samples([3, 1, 2, 0])
    assert (again[[3, 1, 2, 0]].int() - images.int()).abs().max() <= 1  # uint8 rounding of fp32 rounding
    assert (images[0].int() - images[1].int()).abs().max() > 10
