"""Every Triton kernel compiles for the GPUs it is meant for (sm_90: H100/H200), checked here without a GPU.

The interpreter tests (test_kernels.py) check numbers; these check that Triton's real compiler accepts the kernels
in every variant SD1.5 launches, down to a cubin, and that nothing spills. They run in subprocesses because Triton
decides at decoration time whether a kernel is interpreted, and this test session interprets them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], interpret: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_in_every_dtype_without_spills(tmp_path):
    result = _run(["-m", "streamsynth.benchmarks.kernel_compile_check", "--cuda-arch", "90", "--out", str(tmp_path)])
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "kernel-compile-check.json").read_text())
    assert report["failures"] == []
    compiled = {(v["kernel"], v["launch"].split()[0]) for v in report["variants"]}
    assert compiled == {(k, d) for k in ("group_norm", "group_norm_flat", "geglu", "guided_step", "postprocess",
                                         "decode_attention") for d in ("fp32", "fp16", "bf16")}
    for variant in report["variants"]:
        assert variant["registers"] and variant["registers"] <= 255, variant
        assert variant["local_bytes"] == 0, f"spills to local memory: {variant}"
    assert "0 failures" in result.stdout


BROKEN_KERNEL = textwrap.dedent("""
    import torch, triton, triton.language as tl
    from streamsynth.kernels.compile_check import compile_only

    @triton.jit
    def _sum_kernel(X, Y, n, BLOCK: tl.constexpr):
        total = 0  # an int that the loop turns into a float: the interpreter accepts it, the compiler does not
        for start in range(0, n, BLOCK):
            total += tl.sum(tl.load(X + start + tl.arange(0, BLOCK)))
        tl.store(Y, total)

    x, y = torch.ones(64), torch.zeros(1)
    if {interpret}:
        _sum_kernel[(1,)](x, y, 64, BLOCK=16)
        print("interpreted:", y.item())
    else:
        with compile_only(90, lambda *args: None):
            _sum_kernel[(1,)](x, y, 64, BLOCK=16)
""")


def test_the_compiler_rejects_what_the_interpreter_accepts(tmp_path):
    for interpret in (True, False):  # Triton reads a kernel's source from its file
        (tmp_path / f"broken_{interpret}.py").write_text(BROKEN_KERNEL.format(interpret=interpret))
    interpreted = _run([str(tmp_path / "broken_True.py")], interpret=True)
    assert interpreted.returncode == 0 and "interpreted: 64.0" in interpreted.stdout, interpreted.stderr
    compiled = _run([str(tmp_path / "broken_False.py")])
    assert compiled.returncode != 0
    assert "CompilationError" in compiled.stderr and "Loop-carried variable total" in compiled.stderr


def test_the_check_refuses_to_run_under_the_interpreter(monkeypatch, capsys):
    from streamsynth.benchmarks.kernel_compile_check import main

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit) as exit:
        main([])
    assert exit.value.code == 2 and "unset TRITON_INTERPRET" in capsys.readouterr().err
