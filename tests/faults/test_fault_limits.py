"""A small /dev/shm and a file-size limit (`ulimit -f`): `evaluate` and `caption` adapt their DataLoader workers before
work starts and finish, a batch a worker still cannot hand over is one line (never a hang), and a write past the
limit says `ulimit -f`, not "no space left".

The small /dev/shm is real where the machine allows it (a tmpfs mounted over /dev/shm in a forked child's private
mount namespace, `faultkit.mount_small_fs`), else the planner's view of it is monkeypatched; the file-size limit is
real, set in a forked child with `resource.setrlimit`.
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import pytest
import torch

from conftest import png
from faultkit import assert_clean_error, mount_small_fs, run_forked, small_fs_available
from streamsynth import limits
from streamsynth.classifier.checkpoints import check_checkpoint_room
from streamsynth.classifier.models import build_classifier, classifier_checkpoint
from streamsynth.cli import main as cli
from streamsynth.errors import FileSizeLimitError

CLASSES = ["n01440764", "n02102040", "n02979186"]
MiB = 1 << 20


def _shm(free: int, total: int | None = None):
    return lambda: limits.SharedMemory("/dev/shm", total or free, free)


@pytest.fixture
def shm(monkeypatch):
    """Make the planner see a /dev/shm with `free` bytes free (and nothing said before: it warns once per reason)."""
    monkeypatch.setattr(limits, "_said", set())

    def set_free(free: int | None) -> None:
        monkeypatch.setattr(limits, "shared_memory", (lambda: None) if free is None else _shm(free))
    return set_free


def _fsize(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


# ---------------------------------------------------------------- the planner, on the numbers of the defaults

EVAL_BATCH = 256 * 3 * 224 * 224 * 4  # evaluate's default batch of 224-pixel float32 images: 147 MiB


@pytest.mark.parametrize("free, expected", [
    (64 * MiB, (0, None)),  # Docker's default: not even one batch fits; the main process decodes
    (1024 * MiB, (3, 1)),  # room for 5 batches: 3 workers of one batch each, and 2 in use
    (64 * 1024 * MiB, (4, 2)),  # plenty: as asked, no warning
    (None, (4, 2)),  # no /dev/shm to measure: as asked
])
def test_the_planner_fits_the_workers_to_shared_memory(shm, caplog, free, expected):
    shm(free)
    plan = limits.plan_workers(4, lambda w: EVAL_BATCH, what="decoding val")
    assert (plan.workers, plan.prefetch_factor) == expected
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if expected == (4, 2):
        assert plan.reason == "" and warnings == []
    else:
        assert warnings == [plan.reason] and "\n" not in plan.reason
        assert "decoding val: 4 workers would hold 1.4 GiB" in plan.reason and "--shm-size=2g" in plan.reason


def test_the_planner_counts_a_short_loader_and_this_machines_ranks(shm, monkeypatch):
    shm(64 * MiB)
    assert limits.plan_workers(4, lambda w: 10 * MiB, items=2).workers == 4  # 2 batches of 10 MiB: they fit
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert limits.plan_workers(4, lambda w: 10 * MiB, items=2).workers == 0  # 6 MiB each for 8 ranks


def test_a_loader_that_needs_its_workers_stops_in_one_line(shm):
    shm(64 * MiB)
    with pytest.raises(limits.SharedMemoryError) as err:
        limits.plan_workers(4, lambda w: EVAL_BATCH, in_process_ok=False, what="the stream's workers",
                            fewer="a smaller --batch-size")
    message = str(err.value)
    assert "\n" not in message and "64.0 MiB free" in message and "docker run --shm-size=2g" in message
    assert message.endswith("or pass a smaller --batch-size")


def test_the_planner_keeps_each_batch_under_the_file_size_limit(shm):
    shm(None)

    def planned():
        plan = limits.plan_workers(2, lambda w: 2 * MiB)
        return plan.workers, plan.reason

    result = run_forked(lambda: (_fsize(1 * MiB), planned())[1])
    assert result.status == 0, result.describe()
    workers, reason = result.value
    assert workers == 0 and "file-size limit (`ulimit -f`: 1.0 MiB)" in reason and "ulimit -f unlimited" in reason


# ---------------------------------------------------------------- evaluate and caption at their defaults


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(classifier_checkpoint(build_classifier("squeezenet1_1", 3), "squeezenet1_1", CLASSES, image_size=224),
               path)
    return path


def _val(root: Path, per_class: int) -> Path:
    for c, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / cls / f"{i}.png").write_bytes(png(100 * c + i, (16, 16)))
    return root


def _needs_small_fs() -> None:
    reason = small_fs_available()
    if reason:
        pytest.skip(reason)


def test_evaluate_at_its_defaults_with_dockers_64_mib_of_shared_memory(tmp_path, checkpoint):
    """The issue's case: 4 workers and batches of 256 at 224 pixels; a batch of these 105 images is 60 MiB."""
    _needs_small_fs()
    val = _val(tmp_path / "val", 35)

    def evaluate():
        mount_small_fs("/dev/shm", 64 * MiB)
        return cli(["evaluate", str(checkpoint), "--imagenet-val", str(val), "--out", str(tmp_path / "out"),
                    "--device", "cpu"])

    result = run_forked(evaluate, timeout=60)
    assert result.status == 0 and "Traceback" not in result.text, result.describe()
    assert "decoding in the main process instead" in result.err and "--shm-size=" in result.err
    [scored] = json.loads((tmp_path / "out" / "eval.json").read_text())["results"]
    assert scored["images"] == 105


def test_a_batch_a_worker_cannot_hand_over_is_one_line_not_a_hang(tmp_path, checkpoint, shm):
    """The planner is told /dev/shm is large; the real one (256 KiB) cannot take a batch (30 images, 17 MiB)."""
    _needs_small_fs()
    shm(1 << 40)
    val = _val(tmp_path / "val", 10)

    def evaluate():
        mount_small_fs("/dev/shm", 256 << 10)
        return cli(["evaluate", str(checkpoint), "--imagenet-val", str(val), "--out", str(tmp_path / "out"),
                    "--device", "cpu", "--workers", "2"])

    assert_clean_error(run_forked(evaluate, timeout=60), "cannot hand over a batch", "--workers 0", "--shm-size=",
                       status=2)
    assert not (tmp_path / "out").exists()


class BigPixels:
    """A captioner's processor whose output takes real room (3 x size x size float32: 48 KiB an image at 64 pixels,
    1.7 MiB at BLIP-2's 384), so that shares of batches need real room in shared memory."""

    def __init__(self, size: int = 64):
        self.size = size

    def __call__(self, image):
        import numpy as np

        mean = torch.from_numpy(np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(0) / 255)
        return mean[:, None, None].expand(3, self.size, self.size).contiguous()


@pytest.fixture
def big_captioner(stub_captioner, monkeypatch):
    monkeypatch.setattr(stub_captioner, "preprocessor", BigPixels())
    monkeypatch.setattr(stub_captioner, "caption", lambda pixels: [f"colour {p[:, 0, 0].tolist()}" for p in pixels])
    return stub_captioner


def _images(image_tree, root: Path, count: int = 12) -> Path:
    return image_tree(root, {f"{CLASSES[i % 2]}/{i:03d}.png": i for i in range(count)})


def _caption(images: Path, out: Path, *extra: str) -> int:
    """`streamsynth caption` at its defaults (on the CPU: batches of 8, min(8, CPUs) workers)."""
    return cli(["caption", "--images", str(images), "--out", str(out), "--captioner", "stub", "--device", "cpu",
                "--no-progress", *extra])


def test_caption_at_its_defaults_with_dockers_64_mib_of_shared_memory(tmp_path, image_tree, big_captioner,
                                                                      monkeypatch):
    """BLIP-2's 384-pixel float32 images on the CPU, batches of 8: 3 workers' shares (5 MiB each), two in flight per
    worker, do not fit in 64 MiB; one each does, and the run ends."""
    _needs_small_fs()
    monkeypatch.setattr(big_captioner, "preprocessor", BigPixels(384))
    monkeypatch.setattr(os, "cpu_count", lambda: 3)  # the default workers: min(8, CPUs)
    monkeypatch.setattr(limits, "_said", set())
    images = _images(image_tree, tmp_path / "images")

    def caption():
        mount_small_fs("/dev/shm", 64 * MiB)
        return _caption(images, tmp_path / "c.lmdb")

    result = run_forked(caption, timeout=60)
    assert result.status == 0, result.describe()
    assert "caption: decoding images: 3 workers would hold" in result.err
    assert "using 3 workers prefetching 1 batch each" in result.err
    assert json.loads((tmp_path / "c.lmdb.report.json").read_text())["captions_in_store"] == 12


def test_caption_at_its_defaults_with_little_shared_memory(tmp_path, image_tree, big_captioner, shm, caplog):
    shm(64 << 10)
    assert _caption(_images(image_tree, tmp_path / "images"), tmp_path / "c.lmdb") == 0
    assert "caption: decoding images" in caplog.text and "decoding in the main process" in caplog.text
    report = json.loads((tmp_path / "c.lmdb.report.json").read_text())
    assert report["complete"] and report["captions_in_store"] == 12


def test_a_caption_worker_that_cannot_hand_over_is_one_line(tmp_path, image_tree, big_captioner, shm):
    _needs_small_fs()
    shm(1 << 40)
    images = _images(image_tree, tmp_path / "images")

    def caption():
        mount_small_fs("/dev/shm", 128 << 10)  # a share is 4 images, 192 KiB
        return _caption(images, tmp_path / "c.lmdb", "--workers", "2")

    assert_clean_error(run_forked(caption, timeout=60), "cannot hand over a batch", "--shm-size=", status=2)


def test_caption_under_a_file_size_limit_adapts_and_finishes(tmp_path, image_tree, big_captioner):
    images = _images(image_tree, tmp_path / "images")
    result = run_forked(lambda: (_fsize(160 << 10), _caption(images, tmp_path / "c.lmdb"))[1], timeout=60)
    assert result.status == 0, result.describe()
    assert "file-size limit (`ulimit -f`: 160.0 KiB)" in result.err


# ---------------------------------------------------------------- writes past the file-size limit


def test_an_import_past_the_file_size_limit_says_ulimit(tmp_path):
    source = tmp_path / "c.jsonl"
    source.write_text("".join(json.dumps({"class": f"c{i % 3}", "caption": f"caption number {i} " * 6}) + "\n"
                              for i in range(400)))
    result = run_forked(lambda: (_fsize(32 << 10), cli(["captions", "import", str(source), "--out",
                                                          str(tmp_path / "c.lmdb")]))[1])
    line = assert_clean_error(result, "file-size limit (`ulimit -f`: 32.0 KiB)", "ulimit -f unlimited", status=2)
    assert "no space left" not in line and not (tmp_path / "c.lmdb").exists()


def test_captions_past_the_file_size_limit_keep_what_was_committed(tmp_path, image_tree, stub_captioner):
    images = image_tree(tmp_path / "images", {f"{CLASSES[i % 2]}/{i:03d}.png": i for i in range(300)})
    out = tmp_path / "c.lmdb"
    result = run_forked(lambda: (_fsize(48 << 10), _caption(images, out, "--workers", "0", "--commit-every", "20"))[1])
    line = assert_clean_error(result, "caption store", "`ulimit -f`: 48.0 KiB", "continue with --resume", status=2)
    assert "no space left" not in line and "committed before are kept" in line
    assert _caption(images, out, "--workers", "0", "--resume") == 0  # the limit lifted: it ends
    assert json.loads((tmp_path / "c.lmdb.report.json").read_text())["captions_in_store"] == 300


def test_results_past_the_file_size_limit_keep_the_previous_ones(tmp_path, checkpoint):
    import tempfile

    val = _val(tmp_path / "val", 2)
    # A short folder: the child's one-line error names it and is written to a file under the same limit, which must
    # hold it while the results file (longer) does not fit.
    with tempfile.TemporaryDirectory(prefix="ss-") as short:
        out = Path(short) / "out"
        args = ["evaluate", str(checkpoint), "--imagenet-val", str(val), "--out", str(out), "--device", "cpu",
                "--workers", "0"]
        assert cli(args) == 0
        before = (out / "eval.json").read_text()
        line = assert_clean_error(run_forked(lambda: (_fsize(len(before) - 1), cli(args))[1]), "results", "ulimit -f",
                                  status=2)
        assert "no space left" not in line and (out / "eval.json").read_text() == before


def test_a_checkpoint_above_the_file_size_limit_is_refused_before_training(tmp_path):
    model = build_classifier("squeezenet1_1", 3)

    def check() -> str:
        _fsize(64 << 10)
        try:
            check_checkpoint_room(tmp_path / "checkpoint.pt", model)
        except FileSizeLimitError as err:
            return str(err)
        return ""

    result = run_forked(check)
    assert "ulimit -f" in result.value and "checkpoint" in result.value, result.describe()


def test_an_unbatched_loaders_items_that_cannot_be_handed_over_are_one_line(shm):
    """What the stream's loader would use (`batch_size=None`, one dict per group): the same error, not a hang."""
    _needs_small_fs()

    class Groups(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield {"images": torch.zeros(4, 3, 64, 64), "labels": torch.arange(4)}

    def load():
        mount_small_fs("/dev/shm", 64 << 10)
        loader = torch.utils.data.DataLoader(Groups(), batch_size=None, num_workers=1,
                                             collate_fn=limits.SharedCollate(fix="pass fewer --workers"))
        try:
            next(iter(loader))
        except limits.SharedMemoryError as err:
            return str(err).splitlines()[-1]
        return ""

    result = run_forked(load, timeout=60)
    assert "cannot hand over a batch of 192.0 KiB" in result.value and "pass fewer --workers" in result.value, \
        result.describe()
