"""`streamsynth profile` end to end on the tiny model, and the SD1.5 architecture it builds for GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.slow
def test_profile_dry_run_writes_json_and_png(tmp_path):
    out = tmp_path / "profile"
    # A separate process without TRITON_INTERPRET, as a user runs it: on the CPU the kernels' references run.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["STREAMSYNTH_CACHE"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "streamsynth.cli", "profile", "--sd-arch", "tiny", "--dry", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=170,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "profile.json").read_text())
    assert (out / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    flops = report["flops"]
    assert min(flops["unet_call"], flops["vae_decode"], flops["text_encoder"]) > 0
    assert flops["per_batch"] == report["steps"] * flops["unet_call"] + flops["vae_decode"] + flops["text_encoder"]
    for name in ("diffusers", "streamsynth"):
        path = report["paths"][name]
        assert set(path["stages_s"]) == {"text_encoding", "unet_steps", "vae_decode", "postprocess", "to_cpu"}
        assert abs(sum(path["stages_s"].values()) - path["total_s"]) < 1e-6 * max(1.0, path["total_s"])
        assert path["images_per_s"] == report["batch"] / path["total_s"]
        assert path["achieved_tflops"] > 0 and path["peak_memory_bytes"] > 0 and path["warmup_s"] > 0
        assert path["share_of_peak"] is None  # no peak rate is known for a CPU
    busiest = report["paths"]["streamsynth"]["busiest_ops"]  # one profiled batch of the fast path
    assert 0 < busiest["device_busy_s"] and 0 < busiest["wall_s"] and 0 < len(busiest["ops"]) <= 25
    assert any("conv" in op["name"] for op in busiest["ops"])
    # The UNet's attention calls, each distinct shape once with its count, timed per backend (the CPU runs two).
    attention = report["unet_attention"]
    assert attention and all(call["calls"] > 0 and call["ms"]["math"] > 0 for call in attention)
    assert any(call["key"][2] == 77 for call in attention)  # cross-attention to the prompt's 77 tokens
    assert any(call["key"][2] == call["query"][2] != 77 for call in attention)  # self-attention
    assert set(report["ablation"]) == {"group_norm", "geglu", "guided_step", "postprocess"}
    assert all(run["images_identical"] for run in report["ablation"].values())
    # With the kernels' references running, the fast path computes exactly what diffusers computes.
    assert not report["kernels_ran_triton"]
    assert report["random_weights"] and "RANDOM WEIGHTS" in result.stdout
    assert report["images_identical"] and report["psnr_db"] is None


def test_sd15_architecture_has_sd15_parameter_counts():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from streamsynth.synth import sd15

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15.UNET)
        vae = AutoencoderKL(**sd15.VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**sd15.TEXT_ENCODER))
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    # The released SD1.5 components: UNet 859.52 M, VAE 83.65 M, CLIP ViT-L/14 text encoder 123.06 M parameters.
    assert round(count(unet) / 1e6, 2) == 859.52
    assert round(count(vae) / 1e6, 2) == 83.65
    assert round(count(text_encoder) / 1e6, 2) == 123.06
