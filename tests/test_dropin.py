"""README.md's drop-in diff, applied to a stand-in for pytorch/examples' imagenet/main.py: an epoch, a resume that
equals the uninterrupted run, and --evaluate."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def readme_diff() -> str:
    readme = (ROOT / "README.md").read_text()
    return re.search(r"### Drop-in for pytorch/examples.*?```diff\n(.*?)```", readme, re.S).group(1)


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
    assert (added, removed) == (8, 6)  # 3 added, 6 replaced by 5


@pytest.mark.slow
def test_the_readme_drop_in_trains_resumes_and_evaluates(tmp_path, tiny_model, write_image_folder):
    import json

    from streamsynth.captions import import_captions

    # 6 captions of 2 classes, an epoch of 2 batches of 3: the script's default 50 denoising steps cost about 0.5 s
    # an image here, and every image is synthesised in each of the 4 epochs the test trains.
    lines = [json.dumps({"class": c, "caption": f"view {i}", "key": f"{c}/{i}.jpg"})
             for c in ("n01440764", "n02102040") for i in range(3)]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    captions = import_captions(tmp_path / "captions.jsonl", tmp_path / "captions.lmdb")
    script = tmp_path / "main.py"
    script.write_text(apply_diff((ROOT / "tests" / "dropin" / "imagenet_main.py").read_text(), readme_diff()))
    data = tmp_path / "imagenet"
    write_image_folder(data / "val", {"n01440764": 2, "n02102040": 1})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(folder: str, *args: str) -> subprocess.CompletedProcess:
        (tmp_path / folder).mkdir(exist_ok=True)
        result = subprocess.run([sys.executable, str(script), str(data), "--captions", str(captions.path),
                                 "--sd-model", str(tiny_model), "-a", "shufflenet_v2_x0_5", "-b", "3", "-j", "1",
                                 "--seed", "0", "-p", "1", "--lr", "0.01", *args], cwd=tmp_path / folder,
                                capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    uninterrupted = run("uninterrupted", "--epochs", "2")
    assert "Epoch: [0] trained on 6 images in 2 batches" in uninterrupted.stdout  # one image per caption
    assert "Epoch: [0][1/2]" in uninterrupted.stdout and " * Acc@1" in uninterrupted.stdout
    run("resumed", "--epochs", "1")
    resumed = run("resumed", "--epochs", "2", "--resume", "checkpoint.pth.tar")
    assert "(epoch 1)" in resumed.stdout and "Epoch: [1] trained on 6 images" in resumed.stdout
    final = [torch.load(tmp_path / f / "checkpoint.pth.tar", weights_only=True)["state_dict"]
             for f in ("uninterrupted", "resumed")]
    for name, tensor in final[0].items():
        assert torch.allclose(final[1][name].float(), tensor.float(), atol=1e-5), name
    evaluated = run("resumed", "--evaluate", "--resume", "checkpoint.pth.tar")
    assert " * Acc@1" in evaluated.stdout and "on 3 images" in evaluated.stdout
    assert "Epoch" not in evaluated.stdout
