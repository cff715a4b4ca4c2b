"""The attention backend choice and the fast-path options on the tiny pipeline."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from streamsynth.synth import attention
from streamsynth.synth.attention import choose_attention



@pytest.fixture
def fake_xformers(monkeypatch):
    """Installs a stand-in `xformers.ops` whose memory_efficient_attention is the given function."""
    def install(function):
        ops = types.SimpleNamespace(memory_efficient_attention=function)
        monkeypatch.setitem(sys.modules, "xformers", types.SimpleNamespace(ops=ops))
        monkeypatch.setitem(sys.modules, "xformers.ops", ops)
        monkeypatch.setattr(attention, "_probes", {})
    return install


def test_attention_falls_back_to_sdpa_when_the_xformers_probe_fails(fake_xformers):
    def no_operator(q, k, v):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    fake_xformers(no_operator)
    choice = choose_attention("cpu")
    assert choice.backend == "sdpa" and "No operator found" in choice.reason
    with pytest.raises(ValueError, match="cannot be used"):
        choose_attention("cpu", prefer="xformers")


def test_attention_uses_xformers_when_its_probe_agrees_with_sdpa(fake_xformers):
    def working(q, k, v):
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    fake_xformers(working)
    assert choose_attention("cpu").backend == "xformers"
    fake_xformers(lambda q, k, v: torch.zeros_like(q))
    assert "disagrees" in choose_attention("cpu").reason


def test_attention_without_xformers_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # makes `import xformers` raise ImportError
    monkeypatch.setattr(attention, "_probes", {})
    choice = choose_attention("cpu")
    assert choice.backend == "sdpa" and "not importable" in choice.reason


@pytest.mark.slow
def test_fast_path_images_match_the_plain_path(tiny_model):
    from streamsynth.synth import SynthesisConfig, Synthesizer, load_pipeline, resize_to_uint8
    from streamsynth.synth.fast import FastPathOptions, apply

    # One step: the interpreted kernels cost seconds a step; tests/test_kernels.py runs the fused step over many.
    config = SynthesisConfig(num_inference_steps=1, guidance_scale=1.5)
    prompts, seeds = ["a photo of tench, a fish"], [3]
    plain = Synthesizer(load_pipeline(tiny_model), config).generate(prompts, seeds)

    pipe = load_pipeline(tiny_model)
    fast = apply(pipe, FastPathOptions(channels_last=True, fuse_qkv=True, fused_step=True, fused_postprocess=True))
    assert fast.fused_step is not None and fast.attention.backend == "sdpa"
    synth = Synthesizer(pipe, config, fused_step=fast.fused_step)
    pipe.scheduler.set_timesteps(config.num_inference_steps)
    latents, generators = synth.initial_latents(seeds)
    decoded = synth.decode(synth.denoise(latents, synth.encode_text(prompts), generators))
    images = fast.postprocess(decoded, 32)
    assert images.dtype == torch.uint8 and images.shape == (1, 3, 32, 32)
    assert (images.int() - resize_to_uint8(plain, 32).int()).abs().max() <= 1


def test_a_compiled_unet_is_left_to_inductor_and_the_vae_keeps_the_kernels(tiny_model):
    """On the H200 the compiled UNet ran faster without the kernels, the (uncompiled) VAE faster with them."""
    from streamsynth.kernels.patch import is_patched
    from streamsynth.synth import load_pipeline
    from streamsynth.synth.fast import FastPathOptions, apply

    eager = load_pipeline(tiny_model)
    apply(eager, FastPathOptions())
    assert is_patched(eager.unet) and is_patched(eager.vae)

    compiled = load_pipeline(tiny_model)
    fast = apply(compiled, FastPathOptions(compile_unet=True))
    assert not is_patched(compiled.unet._orig_mod) and is_patched(compiled.vae)
    assert "'unet'" not in str(fast.applied) and "'vae'" in str(fast.applied)


def test_fast_path_options_reject_conflicts():
    from streamsynth.synth.fast import FastPathOptions

    with pytest.raises(ValueError, match="fuse_qkv"):
        FastPathOptions(fuse_qkv=True, attention="xformers")
    with pytest.raises(ValueError, match="unknown attention backend"):
        FastPathOptions(attention="flash")


def test_the_fast_path_needs_no_triton_where_the_references_run(tiny_model):
    """Triton is an optional extra: on the CPU (no interpreter) the fast path runs its references without it."""
    script = (
        "import sys\n"
        "sys.modules['triton'] = None  # as on a machine without Triton: importing it raises ImportError\n"
        "from streamsynth import FastPathOptions, SynthesisConfig, Synthesizer\n"
        "synth = Synthesizer.from_pretrained(sys.argv[1], config=SynthesisConfig(num_inference_steps=2),\n"
        "                                    fast=FastPathOptions(fused_step=True))\n"
        "assert synth.fast_path.fused_step is not None and 'group_norm' in str(synth.fast_path.applied)\n"
        "print(synth.generate_uint8(['a photo of tench'], [1], 16).shape)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", script, str(tiny_model)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.Size([1, 3, 16, 16])" in result.stdout


def test_the_fast_path_is_the_default_where_synthesis_runs_on_a_gpu():
    """Measured on an H200 (benchmarks/results/2026-11-27-h200-profile-eager.json): faster, images equal to 59 dB.
    Decided by each worker for its own device ("auto"), so every rank of a mixed node gets what suits it."""
    from streamsynth import GeneratorConfig
    from streamsynth.synth.fast import FastPathOptions

    auto = GeneratorConfig("someone/a-model")
    assert auto.fast == "auto"
    assert auto.fast_path_on("cuda:3") == FastPathOptions() and auto.fast_path_on("cpu") is None
    assert GeneratorConfig("someone/a-model", fast=None).fast_path_on("cuda") is None
    assert GeneratorConfig("someone/a-model", fast=FastPathOptions()).fast_path_on("cpu") == FastPathOptions()
    with pytest.raises(ValueError, match="fast must be"):
        GeneratorConfig("someone/a-model", fast="always")
    # What the defaults switch on: the kernels whose ablation showed a gain, not the fused step or post-processing.
    options = FastPathOptions()
    assert options.triton_kernels and not options.fused_step and not options.fused_postprocess
