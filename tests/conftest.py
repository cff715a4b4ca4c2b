"""Shared fixtures: a tiny random Stable Diffusion saved to disk, and a small caption store, built once per run."""

from __future__ import annotations

import os
from pathlib import Path

# One intra-op thread per process unless the caller chose: many tests run synthesis workers beside a trainer, and
# torch's default of one thread per core makes tiny models many times slower on an oversubscribed 2-core machine.
# Set before torch is imported; subprocesses (train.py runs, workers) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Triton kernels run on the CPU through Triton's interpreter. Triton reads this when it is imported and when a kernel
# is decorated, so it must be set before anything imports torch's or streamsynth's Triton code.
os.environ["TRITON_INTERPRET"] = "1"

import pytest

from streamsynth.captions import CaptionStore, import_captions
from streamsynth.synth import save_tiny_pipeline


def pytest_collection_modifyitems(items):
    """Modules with a slow test run first, each kept whole (its module fixtures are built once): a test of a minute
    that starts last keeps one test process busy while the other has nothing left, so the short tests go last."""
    slow_modules = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module not in slow_modules)


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
def tiny_family(tmp_path_factory):
    """`tiny_family(key)`: the folder of a tiny random model of that family (`streamsynth.synth.families`), built
    and saved with save_pretrained once per session; load it with from_pretrained."""
    from streamsynth.synth.tiny import save_random_pipeline

    folders: dict[str, Path] = {}

    def folder(key: str) -> Path:
        if key not in folders:
            folders[key] = save_random_pipeline(tmp_path_factory.mktemp("models") / f"tiny-{key}", key)
        return folders[key]

    return folder


# Ten hand-written caption lists for the Imagenette classes (ImageNet WordNet ids), a test fixture.
IMAGENETTE_CAPTIONS = Path(__file__).parent / "data" / "imagenette_illustrative.jsonl"


@pytest.fixture(scope="session")
def small_generator(tiny_model):
    """The tiny random model as the stream's generator, at test sizes: 16x16 images, 2 steps, on the CPU."""
    from streamsynth import GeneratorConfig, SynthesisConfig

    return GeneratorConfig(tiny_model, synthesis=SynthesisConfig(num_inference_steps=2), image_size=16,
                           devices=("cpu",), batch_size=4)


@pytest.fixture(scope="session")
def blip2_model(tmp_path_factory) -> Path:
    """A tiny random BLIP-2 that can only write lower-case letters, saved as a checkpoint is (tests/imagekit.py)."""
    from imagekit import save_letters_blip2

    return save_letters_blip2(tmp_path_factory.mktemp("models") / "tiny-blip2")


@pytest.fixture(scope="session")
def caption_store(tmp_path_factory) -> CaptionStore:
    """The ten-class illustrative Imagenette captions, imported into an LMDB store."""
    return import_captions(IMAGENETTE_CAPTIONS, tmp_path_factory.mktemp("captions") / "captions.lmdb")


@pytest.fixture(scope="session")
def write_cache():
    """A writer of cache shards as `--cache` writes them (png, cls, json; one shard per entry of `counts`, named by
    its first sample id; `class_ids`, default "c0", "c1", ..., recorded), for tests of training from a cache that need no
    synthesis run."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    from streamsynth.stream.cache import shard_name, write_cache_classes

    def write(folder: Path, counts: list[int], num_classes: int = 3, first_id: int = 0,
              class_ids: list[str] | None = None) -> Path:
        class_ids = class_ids or [f"c{i}" for i in range(num_classes)]
        num_classes = len(class_ids)
        write_cache_classes(folder, class_ids)
        rng = np.random.default_rng(first_id)
        sample_id = first_id
        for count in counts:
            with wds.TarWriter(str(folder / shard_name(0, sample_id))) as writer:
                for _ in range(count):
                    writer.write({"__key__": f"{sample_id:012d}", "cls": sample_id % num_classes,
                                  "json": {"sample_id": sample_id},
                                  "png": Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8))})
                    sample_id += 1
        return folder

    return write


@pytest.fixture(scope="session")
def write_image_folder():
    """A writer of an ImageFolder of random PNGs: `images_per_class` maps class folder name → image count."""
    import numpy as np
    from PIL import Image

    def write(root: Path, images_per_class: dict[str, int]) -> Path:
        rng = np.random.default_rng(len(images_per_class))
        for name, count in images_per_class.items():
            (root / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
        return root

    return write


def pytest_terminal_summary(terminalreporter):
    """One line with the fault suite's own count of cases (tests/faults), whatever else ran. Here, not in
    tests/faults/conftest.py: under pytest-xdist only this conftest is loaded in the process that reports."""
    outcomes: dict[str, str] = {}
    rank = {"passed": 0, "skipped": 1, "failed": 2, "error": 2}
    for outcome in rank:
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            if "tests/faults/" not in nodeid.replace(os.sep, "/"):
                continue
            outcome_name = "failed" if outcome == "error" else outcome
            if rank[outcome_name] >= rank[outcomes.get(nodeid, "passed")]:
                outcomes[nodeid] = outcome_name
    if outcomes:
        counts = {name: sum(1 for o in outcomes.values() if o == name) for name in ("passed", "skipped", "failed")}
        terminalreporter.write_line(
            f"fault-injection suite (tests/faults): {len(outcomes)} cases: {counts['passed']} passed, "
            f"{counts['skipped']} skipped, {counts['failed']} failed"
        )
