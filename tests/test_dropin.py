"""README.md's drop-in diff for pytorch/examples' imagenet/main.py, applied to a stand-in with that script's structure
(tests/dropin/imagenet_main.py) and run through its GPU branches on the CPU (tests/dropin/fake_cuda): one GPU and
DataParallel, resume equal to the uninterrupted run, --evaluate, --dummy, and two spawned DDP ranks on their own GPUs
with disjoint samples. Without the diff's `multiprocessing_context="spawn"` the same run stops in one line."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SEAM = ROOT / "tests" / "dropin" / "fake_cuda"


def readme_diff() -> str:
    readme = (ROOT / "README.md").read_text()
    return re.search(r"\*\*pytorch/examples `imagenet/main.py`\*\*.*?```diff\n(.*?)```", readme, re.S).group(1)


def apply_diff(source: str, diff: str) -> str:
    """Each hunk's context and removed lines, found once in `source`, become its context and added lines."""
    for hunk in re.split(r"^@@.*\n", diff, flags=re.M)[1:]:
        lines = hunk.splitlines()
        old = "\n".join(line[1:] for line in lines if line[:1] in " -") + "\n"
        new = "\n".join(line[1:] for line in lines if line[:1] in " +") + "\n"
        assert source.count(old) == 1, f"hunk not found exactly once:\n{old}"
        source = source.replace(old, new)
    return source


def test_the_diff_counts_what_the_readme_says():
    lines = readme_diff().splitlines()
    added = sum(line.startswith("+") for line in lines)
    removed = sum(line.startswith("-") for line in lines)
    assert (added, removed) == (13, 7)
    assert "(+13/-7 lines)" in (ROOT / "README.md").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model, write_image_folder):
    import json

    from streamsynth.captions import import_captions

    tmp = tmp_path_factory.mktemp("dropin")
    # 16 captions of 2 classes: an epoch of 16 images, 4 new ones each used 4 times (the diff's replay), 4 batches.
    lines = [json.dumps({"class": c, "caption": f"view {i}", "key": f"{c}/{i}.jpg"})
             for c in ("n01440764", "n02102040") for i in range(8)]
    (tmp / "captions.jsonl").write_text("\n".join(lines) + "\n")
    captions = import_captions(tmp / "captions.jsonl", tmp / "captions.lmdb")
    script = tmp / "main.py"
    script.write_text(apply_diff((ROOT / "tests" / "dropin" / "imagenet_main.py").read_text(), readme_diff()))
    without_spawn = tmp / "main_fork.py"
    without_spawn.write_text(script.read_text().replace('multiprocessing_context="spawn" if args.workers else None',
                                                        "multiprocessing_context=None"))
    write_image_folder(tmp / "imagenet" / "val", {"n01440764": 2, "n02102040": 1})
    return {"tmp": tmp, "script": script, "without_spawn": without_spawn, "captions": captions.path,
            "model": tiny_model}


def run(setup, folder: str, *args: str, gpus: int = 1, script: str = "script",
        check: bool = True) -> tuple[subprocess.CompletedProcess, list[tuple[int, str, list[int]]]]:
    """The script in `folder`, "on" `gpus` fake GPUs; returns the result and what each worker made: (pid, device,
    sample ids) per generation group."""
    cwd = setup["tmp"] / folder
    cwd.mkdir(exist_ok=True)
    log = cwd / "groups.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STREAMSYNTH_FAKE_CUDA": str(gpus),
           "STREAMSYNTH_FAKE_CUDA_LOG": str(log), "PYTHONPATH": os.pathsep.join([str(SEAM), str(ROOT)])}
    result = subprocess.run([sys.executable, str(setup[script]), str(setup["tmp"] / "imagenet"),
                             "--captions", str(setup["captions"]), "--sd-model", str(setup["model"]),
                             "-a", "shufflenet_v2_x0_5", "-b", "4", "-j", "1", "--seed", "0", "-p", "1", "--lr", "0.01",
                             *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    groups = [(int(pid), device, [int(i) for i in ids.split()])
              for pid, device, ids in (line.split(" ", 2) for line in log.read_text().splitlines())] \
        if log.exists() else []
    return result, groups


@pytest.mark.slow
def test_one_gpu_trains_resumes_exactly_and_evaluates(setup):
    uninterrupted, groups = run(setup, "uninterrupted", "--epochs", "2")
    assert "Epoch: [0] trained on 16 images in 4 batches" in uninterrupted.stdout  # one use per caption
    assert " * Acc@1" in uninterrupted.stdout
    # One GPU, the model on it (DataParallel): the workers generate on the rank's GPU, epoch 1 has its own images.
    assert {device for _, device, _ in groups} == {"cuda:0"}
    assert sorted(i for _, _, ids in groups for i in ids) == list(range(8))  # 4 new images an epoch
    run(setup, "resumed", "--epochs", "1")
    resumed, _ = run(setup, "resumed", "--epochs", "2", "--resume", "checkpoint.pth.tar")
    assert "(epoch 1)" in resumed.stdout and "Epoch: [1] trained on 16 images" in resumed.stdout
    final = [torch.load(setup["tmp"] / f / "checkpoint.pth.tar", weights_only=True)["state_dict"]
             for f in ("uninterrupted", "resumed")]
    for name, tensor in final[0].items():
        assert torch.allclose(final[1][name].float(), tensor.float(), atol=1e-5), name
    evaluated, _ = run(setup, "resumed", "--evaluate", "--resume", "checkpoint.pth.tar")
    assert " * Acc@1" in evaluated.stdout and "on 3 images" in evaluated.stdout and "Epoch" not in evaluated.stdout
    dummy, groups = run(setup, "dummy", "--dummy", "--epochs", "1")
    assert "Dummy data is used" in dummy.stdout and "trained on 24 images" in dummy.stdout and groups == []


@pytest.mark.slow
def test_two_spawned_ddp_ranks_each_on_their_own_gpu_with_their_own_samples(setup):
    result, groups = run(setup, "ddp", "--multiprocessing-distributed", "--world-size", "1", "--rank", "0",
                         "--dist-backend", "gloo", "--dist-url", f"tcp://127.0.0.1:{_free_port()}", "-b", "4",
                         "--epochs", "1", gpus=2)
    assert result.stdout.count("Epoch: [0] trained on 8 images in 4 batches") == 2  # -b 4 is per node: 2 a rank
    by_device = {}
    for _, device, ids in groups:
        by_device.setdefault(device, []).extend(ids)
    assert set(by_device) == {"cuda:0", "cuda:1"}  # never both ranks' workers on cuda:0
    assert not set(by_device["cuda:0"]) & set(by_device["cuda:1"])
    assert sorted(by_device["cuda:0"] + by_device["cuda:1"]) == list(range(4))


@pytest.mark.slow
def test_without_spawn_the_cuda_stream_stops_in_one_line(setup):
    """The negative control: the seam does reproduce CUDA's refusal after fork, and the stream says so in one line."""
    result, groups = run(setup, "forked", "--epochs", "1", script="without_spawn", check=False)
    assert result.returncode != 0 and groups == []
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("streamsynth.stream.devices.CUDAAfterForkError: ")
    assert 'multiprocessing_context="spawn"' in last
    assert "Original Traceback" not in result.stderr and "in DataLoader worker process" not in result.stderr
