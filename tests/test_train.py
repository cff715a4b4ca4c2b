"""train.py end to end, as a user runs it: a subprocess, the embedded default, a checkpoint, a real val folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streamsynth.classifier.recipe import recipe_from_checkpoint
from streamsynth.commands.options import EMBEDDED, RUN_DEFAULTS

EMBEDDED_PRESET = RUN_DEFAULTS[EMBEDDED]

ROOT = Path(__file__).resolve().parents[1]


def _train(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "STREAMSYNTH_CACHE": str(cache)}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args],
                          capture_output=True, text=True, env=env, timeout=600)


# The default main job's classifier, trained on synthetic digits alone, scored on the held-out real digits: the
# issue's acceptance figure; measured 90% (see README), and near 10% when it learns nothing.
DEFAULT_JOB_LEARNS = 70.0


@pytest.mark.slow
def test_default_main_job(tmp_path, isolated_cache):
    """The README's main job, unchanged: embedded model and captions, default settings; it learns real digits."""
    result = _train("--online-synthesis", "--out", str(tmp_path / "run"), cache=isolated_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RANDOM WEIGHTS" not in result.stderr
    assert "TINY text-to-image model" in result.stdout and "not Stable Diffusion" in result.stdout
    steps = EMBEDDED_PRESET["steps"]
    assert "train: 100%" in result.stderr and f"{steps}/{steps}" in result.stderr
    # Nothing but our own log lines and the progress bar: no third-party warning (diffusers' notice that accelerate
    # is missing was one, in every worker) and no INFO line from the workers' fast path.
    ours = ("train:", "WARNING streamsynth", "WARNING train", "INFO train")
    foreign = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()
               and not line.startswith(ours)]
    assert foreign == [], foreign
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == steps and checkpoint["num_classes"] == 10
    assert checkpoint["arch"] == EMBEDDED_PRESET["model"] and checkpoint["class_ids"] == [str(d) for d in range(10)]
    assert checkpoint["stream"]["random_weights"] is False
    top1 = float(re.search(r"held-out real digits: top-1 ([0-9.]+)%", result.stdout).group(1))
    assert top1 >= DEFAULT_JOB_LEARNS, result.stdout[-2000:]
    log_lines = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert log_lines[0].startswith("step,loss") and len(log_lines) == 1 + steps // 10
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    # What the run recorded is what --print-config says it would use, and what its checkpoint holds.
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    printed = _train("--online-synthesis", "--out", str(tmp_path / "run"), "--print-config", cache=isolated_cache)
    assert json.loads(printed.stdout) == recorded == checkpoint["config"]
    # The privacy audit's shadow models take the recipe this checkpoint records.
    recipe = recipe_from_checkpoint(checkpoint)
    assert (recipe.steps, recipe.batch_size, recipe.warmup) == (steps, recorded["batch_size"], recorded["warmup_steps"])
    assert recipe.peak_lr == pytest.approx(recorded["lr"])
    # A rerun over the finished run is refused, and changes nothing.
    again = _train("--online-synthesis", "--out", str(tmp_path / "run"), cache=isolated_cache)
    assert again.returncode == 2 and "continue it with --resume" in again.stderr
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == steps


def test_config_of_a_run_reruns_it(tmp_path, isolated_cache, caption_store, tiny_model):
    """`--config OUT/run.json` is the run again: the same samples in the same batches, the same weights after them."""
    first = _train("--online-synthesis", "--sd-model", str(tiny_model), "--captions", str(caption_store.path),
                   "--steps", "2", "-b", "4", "--image-size", "16", "--model", "resnet18", "-j", "0", "--seed", "7",
                   "--num-inference-steps", "2", "--log-sample-ids", "--out", str(tmp_path / "a"), cache=isolated_cache)
    assert first.returncode == 0, first.stderr[-3000:]
    again = _train("--config", str(tmp_path / "a" / "run.json"), "--out", str(tmp_path / "b"), cache=isolated_cache)
    assert again.returncode == 0, again.stderr[-3000:]
    ids = [(tmp_path / run / "sample_ids-rank0.csv").read_text() for run in ("a", "b")]
    assert ids[0] == ids[1] and ids[0].startswith("0,0,synthetic,")
    weights = [torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["model"] for run in ("a", "b")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    configs = [json.loads((tmp_path / run / "run.json").read_text())["config"] for run in ("a", "b")]
    assert {k for k in configs[0] if configs[0][k] != configs[1][k]} == {"out"}


def test_imagenet_val_top1(tmp_path, isolated_cache, caption_store, tiny_model, write_image_folder):
    val = write_image_folder(tmp_path / "val", dict.fromkeys([c.id for c in caption_store.classes][:4], 2))
    result = _train("--online-synthesis", "--sd-model", str(tiny_model), "--captions", str(caption_store.path),
                    "--imagenet-val", str(val),
                    "--steps", "3", "--batch-size", "4", "--image-size", "32", "--model", "resnet18",
                    "--workers", "0", "--num-inference-steps", "2", "--out", str(tmp_path / "run"), cache=isolated_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "evaluation at step 3" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("imagenet-val"))
    assert row.split()[1] == "8"  # images scored
    assert (tmp_path / "run" / "results-final.json").is_file() and (tmp_path / "run" / "results-final.csv").is_file()


def test_a_missing_evaluation_folder_fails_before_training(tmp_path, isolated_cache, caption_store, tiny_model):
    result = _train("--online-synthesis", "--sd-model", str(tiny_model), "--captions", str(caption_store.path),
                    "--imagenet-r", str(tmp_path / "no-such-folder"), "--out", str(tmp_path / "run"), cache=isolated_cache)
    assert result.returncode != 0 and "imagenet-r folder" in result.stderr and "does not exist" in result.stderr
    assert "train:" not in result.stderr


def test_real_baseline_and_real_plus_synthetic_mix(tmp_path, isolated_cache, caption_store, tiny_model,
                                                   write_image_folder):
    class_ids = [c.id for c in caption_store.classes]
    real = write_image_folder(tmp_path / "train", dict.fromkeys(class_ids[:3], 2))
    val = write_image_folder(tmp_path / "val", dict.fromkeys(class_ids[:3], 2))
    small = ["--steps", "4", "--batch-size", "2", "--image-size", "16", "--model", "resnet18", "--workers", "0"]
    baseline = _train("--train-dir", str(real), "--imagenet-val", str(val), *small, "--out", str(tmp_path / "real"),
                      cache=isolated_cache)
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    assert "3 classes from real 100%" in baseline.stdout and "imagenet-val" in baseline.stdout
    assert "RANDOM WEIGHTS" not in baseline.stderr  # no generator involved
    # --resume PATH (as pytorch/examples and timm take it): another run's checkpoint, continued into a new --out
    first = tmp_path / "real" / "checkpoint.pt"
    resumed = _train("--train-dir", str(real), *small, "--steps", "6", "--resume", str(first),
                     "--out", str(tmp_path / "resumed"), cache=isolated_cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {first} at step 4" in resumed.stdout
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 6
    assert torch.load(first, weights_only=True)["step"] == 4  # the checkpoint resumed from is left as it was

    mixed = _train("--online-synthesis", "--train-dir", str(real), "--mix", "synthetic=3,real=1",
                   "--sd-model", str(tiny_model), "--captions", str(caption_store.path), "--num-inference-steps", "1",
                   "--accum-steps", "2", "--lr-schedule", "step", "--channels-last", "--tensorboard",
                   "--log-images-every", "2", *small, "--out", str(tmp_path / "mixed"), cache=isolated_cache)
    assert mixed.returncode == 0, mixed.stderr[-3000:]
    assert "10 classes from synthetic 75%, real 25%" in mixed.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "mixed" / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert "train/loss" in events.Tags()["scalars"]
    grids = {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]}
    assert set(grids) <= {"batch/synthetic", "batch/real"} and sorted(s for v in grids.values() for s in v) == [0, 2]
    checkpoint = torch.load(tmp_path / "mixed" / "checkpoint.pt", weights_only=True)
    assert checkpoint["class_ids"] == class_ids and checkpoint["config"]["accum_steps"] == 2

    bad = _train("--online-synthesis", "--mix", "real=1", "--sd-model", str(tiny_model), "--captions",
                 str(caption_store.path), *small, "--out", str(tmp_path / "bad"), cache=isolated_cache)
    assert bad.returncode != 0 and "enabled sources are ['synthetic']" in bad.stderr


@pytest.mark.parametrize("bad, message", [
    (["--captions", "/no/such/captions.lmdb"], "caption store /no/such/captions.lmdb does not exist"),
    (["--sd-model", "/no/such/model"], "model folder /no/such/model does not exist"),
    (["--model", "resnet999"], "unknown classifier architecture 'resnet999'"),
])
def test_bad_input_is_a_clear_error_before_training(tmp_path, isolated_cache, bad, message):
    result = _train("--online-synthesis", *bad, "--out", str(tmp_path / "run"), cache=isolated_cache)
    assert result.returncode != 0 and message in result.stderr
    assert "Traceback" not in result.stderr and "train:" not in result.stderr


def test_cache_then_train_from_cache(tmp_path, isolated_cache, caption_store, tiny_model):
    common = ["--sd-model", str(tiny_model), "--captions", str(caption_store.path), "--steps", "3",
              "--batch-size", "2", "--image-size", "16", "--model", "resnet18", "--workers", "1",
              "--num-inference-steps", "1"]
    cache = tmp_path / "cache"
    first = _train("--online-synthesis", "--cache", str(cache), *common, "--out", str(tmp_path / "a"),
                   cache=isolated_cache)
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(list(cache.glob("*.tar"))) >= 3  # one shard per generated batch of 2
    second = _train("--from-cache", str(cache), *common, "--out", str(tmp_path / "b"), cache=isolated_cache)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "from cache 100%" in second.stdout
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 3


def test_a_run_folder_holds_one_run_at_a_time(tmp_path, isolated_cache):
    """A second run into a folder another run holds is refused in one line, before it does anything."""
    from streamsynth.train import RunFolder

    held = RunFolder(tmp_path / "run", resuming=False)  # this process holds the folder, as a running train.py does
    result = _train("--online-synthesis", "--out", str(tmp_path / "run"), cache=isolated_cache)
    assert result.returncode == 2 and "is in use by another run (pid" in result.stderr, result.stderr[-2000:]
    assert "train:" not in result.stderr and not (tmp_path / "run" / "run.json").exists()
    del held
    # And a running train.py holds its folder for as long as it runs.
    import time

    from streamsynth.train import RunError

    running = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--online-synthesis", "--out",
                                str(tmp_path / "other")], env={**os.environ, "STREAMSYNTH_CACHE": str(isolated_cache)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "other" / "run.json").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        with pytest.raises(RunError, match="in use by another run"):
            RunFolder(tmp_path / "other", resuming=True)
    finally:
        running.kill()
        running.wait()


@pytest.mark.slow
def test_ctrl_c_saves_at_a_step_boundary_and_the_resumed_run_takes_every_batch_once(tmp_path, isolated_cache,
                                                                                     caption_store, tiny_model):
    """Ctrl-C reaches the trainer and its workers (the terminal's whole process group): the run saves as of the step
    in hand and exits 130 in one line; resumed, it takes the stream's batches in the layout's order, none twice."""
    import signal
    import time

    from streamsynth.stream.layout import StreamLayout

    run = ["--online-synthesis", "--sd-model", str(tiny_model), "--captions", str(caption_store.path), "--steps", "30",
           "-b", "4", "--image-size", "16", "--model", "resnet18", "-j", "1", "--num-inference-steps", "1",
           "--log-every", "2", "--log-sample-ids", "--replay", "2", "--out", str(tmp_path / "run")]
    started = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *run], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env={**os.environ, "STREAMSYNTH_CACHE": str(isolated_cache)})
    log = tmp_path / "run" / "log.csv"
    deadline = time.monotonic() + 300
    while (not log.exists() or len(log.read_text().splitlines()) < 4) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(started.pid, signal.SIGINT)  # as a terminal's Ctrl-C does
    _, stderr = started.communicate(timeout=300)
    assert started.returncode == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    saved = int(re.search(r"interrupted: saved .*checkpoint.pt at step (\d+); continue", last).group(1))
    assert 0 < saved < 30 and "Traceback" not in stderr
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == saved
    resumed = _train(*run, "--resume", cache=isolated_cache)
    assert resumed.returncode == 0 and f"at step {saved}" in resumed.stdout, resumed.stderr[-3000:]
    taken = {}
    for line in (tmp_path / "run" / "sample_ids-rank0.csv").read_text().splitlines():
        step, _, _, ids = line.split(",", 3)
        taken.setdefault(int(step), []).append([int(i) for i in ids.split()])
    layout = StreamLayout(seed=0, epoch_size=sum(c.num_captions for c in caption_store.classes), batch_size=4,
                          replay=2)
    expected = [list(layout.batch_sample_ids(*divmod(s, layout.batches_per_epoch))[0]) for s in range(30)]
    # Steps before the interruption may have been taken and not saved (the step in hand): they come again, the same.
    assert sorted(taken) == list(range(30)) and all(batches[-1] == expected[s] for s, batches in taken.items())
    assert all(len(batches) == 1 for s, batches in taken.items() if s != saved)
