"""The built wheel: streamsynth is its only top-level package, with the repository's kernels/ inside it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def build_wheel(tmp_path: Path) -> Path:
    """Builds the wheel from a copy of the sources (the build leaves build/ and egg-info where it runs)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("streamsynth", "kernels"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    return next((tmp_path / "dist").glob("streamsynth-*.whl"))


def test_the_wheel_installs_no_top_level_kernels_package(tmp_path):
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    installed = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert installed == {"streamsynth"}, installed
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["streamsynth"]

    # Every module of the repository is in it, the kernels as streamsynth.kernels; so is the embedded caption data.
    expected = {f"streamsynth/{p.relative_to(ROOT / 'streamsynth').as_posix()}"
                for p in (ROOT / "streamsynth").rglob("*.py")}
    expected |= {f"streamsynth/kernels/{p.relative_to(ROOT / 'kernels').as_posix()}"
                 for p in (ROOT / "kernels").rglob("*.py")}
    assert expected - names == set(), "modules left out of the wheel: list their package in pyproject.toml"
    assert {n for n in names if n.endswith(".py")} == expected
    assert "streamsynth/data/digits-sd/unet/diffusion_pytorch_model.safetensors" in names  # the embedded generator

    # Installed, streamsynth.kernels is the installed folder (no finder for a checkout), and it patches a model.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    assert not (site / "kernels").exists()
    script = (
        "import sys, streamsynth, streamsynth.kernels.patch as patch\n"
        "from streamsynth.kernels.dispatch import KERNEL_NAMES\n"
        "assert patch.__file__.startswith(sys.argv[1]), patch.__file__\n"
        "assert not any(type(f).__name__ == '_RepositoryKernels' for f in sys.meta_path)\n"
        "print(KERNEL_NAMES)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(site)
    result = subprocess.run([sys.executable, "-c", script, str(site)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "group_norm" in result.stdout
    # The installed commands, away from any checkout: the training loop is in the wheel (`streamsynth train`).
    for args, said in ((["--version"], "streamsynth 0."), (["train", "--help"], "usage: streamsynth train")):
        result = subprocess.run([sys.executable, "-m", "streamsynth", *args], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and said in result.stdout, result.stderr[-3000:]


def test_every_public_name_imports_on_first_use():
    """The package's API is imported lazily (PEP 562): each name of __all__ resolves, and nothing else does."""
    import streamsynth

    assert sorted(streamsynth.__all__) == sorted(streamsynth._PUBLIC)
    for name in streamsynth.__all__:
        assert getattr(streamsynth, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'Nonexistent'"):
        streamsynth.Nonexistent


def test_the_checkout_never_shadows_an_installed_kernels_package(tmp_path):
    """From the repository root (where `python train.py` and `python -m pytest` put the checkout on sys.path),
    `import kernels` is an installed package of that name (Hugging Face's, which transformers imports), and
    streamsynth's own kernels still import as `streamsynth.kernels`. The installed one is a stand-in in a temporary
    site folder, so this holds without a network and whatever this environment has installed."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("CUDAProperties = 'the installed kernels package'\n")
    script = ("import kernels, streamsynth.kernels.dispatch as dispatch\n"
              "print(kernels.__file__)\nprint(kernels.CUDAProperties)\nprint(dispatch.__file__)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(site)  # after the script's folder on sys.path, as site-packages is
    for run in (["-c", script], ["-m", "streamsynth.cli", "--version"]):
        result = subprocess.run([sys.executable, *run], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
    lines = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120).stdout.splitlines()
    assert lines[:2] == [str(site / "kernels" / "__init__.py"), "the installed kernels package"]
    assert lines[2] == str(ROOT / "kernels" / "dispatch.py")
    # The root cause stays removed: a regular package there would win over every installed one.
    assert not (ROOT / "kernels" / "__init__.py").exists()
