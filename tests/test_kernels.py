"""The Triton kernels against their references, run on the CPU under Triton's interpreter.

Tolerances (also in kernels/README.md), against the reference computed in fp32 from the same inputs:
fp32 atol = rtol = 1e-5; fp16 atol = rtol = 2e-3; bf16 atol = rtol = 1.6e-2 (one rounding of the output).
The fused guidance + scheduler step must equal `scheduler.step` bit for bit on the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from streamsynth.kernels.dispatch import disabled, set_enabled
from streamsynth.kernels.dispatch import is_interpreted, triton_kernel
from streamsynth.kernels.geglu import FusedGEGLU, geglu, geglu_reference
from streamsynth.kernels.group_norm import FusedGroupNorm, group_norm, group_norm_reference
from streamsynth.kernels.guided_step import FusedGuidedStep, guided_step_reference, unsupported_reason
from streamsynth.kernels.patch import is_patched, patch, unpatch
from streamsynth.kernels.postprocess import postprocess, postprocess_reference
from streamsynth.kernels.workloads import TOLERANCES

SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, set_alpha_to_one=False)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


def test_kernels_run_under_the_interpreter():
    assert is_interpreted(triton_kernel("group_norm")) and is_interpreted(triton_kernel("geglu"))


# GroupNorm (+ SiLU)

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("channels, size", [(40, 7), (32, 7), (40, 30)])
def test_group_norm_matches_reference(dtype, channels_last, silu, channels, size):
    """5 channels a group (NCHW: the flat kernel), 4 (the tiled one), and groups of several tiles (5 x 900 > 4096)."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(3, channels, size, size, generator=generator) * 3 + 5).to(dtype)  # an offset mean
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = (torch.randn(channels, generator=generator).to(dtype) for _ in range(2))
    y = group_norm(x, 8, weight, bias, eps=1e-6, silu=silu)
    assert y.stride() == x.stride()
    assert_matches(y, group_norm_reference(x.float(), 8, weight.float(), bias.float(), 1e-6, silu), dtype)


def test_group_norm_matches_torch_modules_and_other_layouts():
    x = torch.randn(3, 40, 7, 7)
    norm = torch.nn.GroupNorm(8, 40, eps=1e-6)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    fused = FusedGroupNorm.from_module(norm, silu=True)
    assert_matches(fused(x), F.silu(norm(x)), torch.float32)
    # bf16, and the (batch, channels, tokens) view diffusers' attention passes (channels innermost in memory)
    x16 = torch.randn(3, 40, 7, 7).to(torch.bfloat16)
    assert_matches(group_norm(x16, 8), group_norm_reference(x16.float(), 8, None, None, 1e-5, False), torch.bfloat16)
    tokens = torch.randn(2, 9, 40).transpose(1, 2)
    assert_matches(group_norm(tokens, 8), F.group_norm(tokens, 8), torch.float32)
    strided = torch.randn(2, 40, 5, 10)[..., ::2]  # not dense: the output is written contiguous
    assert_matches(group_norm(strided, 8), F.group_norm(strided, 8), torch.float32)


@pytest.mark.parametrize("make_input, message", [
    (lambda: (torch.randn(2, 40, 5, 5), 7, None), "not divisible"),
    (lambda: (torch.randn(2, 40), 8, None), "spatial dimension"),
    (lambda: (torch.randint(0, 9, (2, 40, 5, 5)), 8, None), "dtype"),
    (lambda: (torch.randn(2, 40, 5, 6).transpose(2, 3), 8, None), "contiguous"),
    (lambda: (torch.randn(2, 40, 5, 5), 8, torch.ones(20)), "weight has shape"),
    (lambda: (torch.randn(2, 40, 5, 5), 8, torch.ones(40, device="meta")), "one device"),
])
def test_group_norm_rejects_bad_input(make_input, message):
    x, groups, weight = make_input()
    with pytest.raises(ValueError, match=message):
        group_norm(x, groups, weight, None if weight is None else torch.zeros_like(weight))


# GEGLU

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_geglu_matches_reference(dtype, with_bias):
    generator = torch.Generator().manual_seed(0)
    projected = (torch.randn(3, 5, 2 * 40, generator=generator) * 2).to(dtype)  # width 40: not a power of two
    bias = torch.randn(80, generator=generator).to(dtype) if with_bias else None
    expected = geglu_reference(projected.float(), None if bias is None else bias.float())
    assert_matches(geglu(projected, bias), expected, dtype)


def test_fused_geglu_module_matches_diffusers():
    from diffusers.models.activations import GEGLU

    torch.manual_seed(0)
    module = torch.nn.Sequential(GEGLU(24, 40))
    x = torch.randn(3, 7, 24)
    expected = module(x)
    assert patch(module) == {"geglu": 1} and isinstance(module[0], FusedGEGLU)
    assert_matches(module(x), expected, torch.float32)


@pytest.mark.parametrize("projected, bias, message", [
    (torch.randn(3, 41), None, "even last dimension"),
    (torch.randn(80, 3).t(), None, "contiguous"),
    (torch.randn(3, 80), torch.randn(40), "bias has shape"),
    (torch.randn(3, 80).to(torch.float64), None, "dtype"),
])
def test_geglu_rejects_bad_input(projected, bias, message):
    with pytest.raises(ValueError, match=message):
        geglu(projected, bias)


# Guidance + scheduler step

def make_scheduler(name: str):
    from diffusers import DDIMScheduler, PNDMScheduler

    if name == "pndm":
        return PNDMScheduler(skip_prk_steps=True, **SD15_SCHEDULER)
    return DDIMScheduler(clip_sample=False, **SD15_SCHEDULER)


@pytest.mark.parametrize("name", ["pndm", "ddim"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("guidance_scale", [1.5, None])
def test_fused_step_equals_scheduler_step(name, dtype, guidance_scale):
    reference, fused_scheduler = make_scheduler(name), make_scheduler(name)
    reference.set_timesteps(7), fused_scheduler.set_timesteps(7)
    fused = FusedGuidedStep(fused_scheduler)
    generator = torch.Generator().manual_seed(0)
    expected = torch.randn(3, 4, 5, 5, generator=generator).to(dtype)
    actual = expected.clone()
    rows = 6 if guidance_scale else 3
    for t in reference.timesteps:
        noise = torch.randn(rows, 4, 5, 5, generator=generator).to(dtype)
        expected = guided_step_reference(reference, noise, t, expected, guidance_scale)
        actual = fused(noise, t, actual, guidance_scale)
        assert torch.equal(actual, expected), f"step at t={int(t)} differs"
    if name == "pndm":  # the multistep state stays as scheduler.step leaves it
        assert fused_scheduler.counter == reference.counter
        assert all(torch.equal(a, b) for a, b in zip(fused_scheduler.ets, reference.ets))
        assert len(fused_scheduler.ets) == len(reference.ets) == 4


def test_fused_step_rejects_what_it_cannot_compute():
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    assert "EulerDiscreteScheduler" in unsupported_reason(EulerDiscreteScheduler())
    with pytest.raises(ValueError, match="skip_prk_steps"):
        FusedGuidedStep(PNDMScheduler(skip_prk_steps=False, **SD15_SCHEDULER))
    scheduler = make_scheduler("ddim")
    scheduler.set_timesteps(3)
    with pytest.raises(ValueError, match="noise has shape"):
        FusedGuidedStep(scheduler)(torch.randn(3, 4, 5, 5), scheduler.timesteps[0], torch.randn(3, 4, 5, 5), 1.5)


# Post-processing

@pytest.mark.parametrize("shape, size", [((3, 3, 37, 29), 13), ((2, 3, 7, 7), 16), ((1, 3, 9, 9), None)])
@pytest.mark.parametrize("normalise", [False, True])
def test_postprocess_matches_interpolate(shape, size, normalise):
    decoded = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.8  # some values clip
    mean, std = (torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])) if normalise else (None, None)
    expected = postprocess_reference(decoded, size, mean, std)
    for layout in (torch.contiguous_format, torch.channels_last):
        actual = postprocess(decoded.contiguous(memory_format=layout), size, mean, std)
        assert actual.shape == expected.shape and actual.is_contiguous()
        if normalise:
            assert_matches(actual, expected, torch.float32)
        else:  # a value a float rounding away from .5 may round the other way: at most 1 in 255, rarely
            assert actual.dtype == torch.uint8
            assert (actual.int() - expected.int()).abs().max() <= 1
            assert (actual == expected).float().mean() > 0.99


def test_postprocess_rejects_bad_input():
    with pytest.raises(ValueError, match="batch, channels, H, W"):
        postprocess(torch.randn(3, 8, 8), 4)
    with pytest.raises(ValueError, match="both mean and std"):
        postprocess(torch.randn(1, 3, 8, 8), 4, mean=torch.zeros(3))
    with pytest.raises(ValueError, match="mean has shape"):
        postprocess(torch.randn(1, 3, 8, 8), 4, mean=torch.zeros(4), std=torch.ones(4))


# Decoding attention (one query token over a KV cache)

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mask_kind", [None, "additive", "bool"])
@pytest.mark.parametrize("keys, key_heads", [(7, 4), (130, 2)])
def test_decode_attention_matches_reference(dtype, mask_kind, keys, key_heads):
    """One tile of keys and three (130 > 64, the online softmax across tiles); keys shared by two query heads; the
    query a transposed view (as transformers passes it) and the cache a slice of a longer one (as a growing cache)."""
    from streamsynth.kernels.decode_attention import decode_attention, decode_attention_reference

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, 1, 4, 20, generator=generator).to(dtype).transpose(1, 2)
    key, value = (torch.randn(3, key_heads, keys + 5, 20, generator=generator).to(dtype)[:, :, :keys]
                  for _ in range(2))
    mask = None
    if mask_kind == "additive":  # graphed decoding's: the last quarter of the slots not filled yet
        mask = torch.zeros(3, 1, 1, keys, dtype=dtype)
        mask[..., keys - keys // 4:] = torch.finfo(dtype).min
    elif mask_kind == "bool":  # transformers' SDPA masks: True where a key is seen, here a different set per head
        mask = torch.rand(3, 4, 1, keys, generator=generator) > 0.3
        mask[..., 0] = True
    out = decode_attention(query, key, value, mask)
    assert out.shape == (3, 4, 1, 20)
    exact_mask = mask if mask is None or mask.dtype == torch.bool else mask.float()
    assert_matches(out, decode_attention_reference(query.float(), key.float(), value.float(), exact_mask), dtype)


def test_decode_attention_rejects_bad_input():
    from streamsynth.kernels.decode_attention import decode_attention

    query, cache = torch.randn(2, 4, 1, 8), torch.randn(2, 4, 5, 8)
    with pytest.raises(ValueError, match="one token"):
        decode_attention(torch.randn(2, 4, 3, 8), cache, cache)
    with pytest.raises(ValueError, match="key heads dividing 4"):
        decode_attention(query, torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8))
    with pytest.raises(ValueError, match="does not broadcast"):
        decode_attention(query, cache, cache, torch.zeros(2, 1, 1, 6))
    with pytest.raises(ValueError, match="convert them to one dtype"):
        decode_attention(query, cache.half(), cache.half())


def test_captioner_decodes_with_the_kernel_and_gives_sdpa_captions(blip2_model, monkeypatch):
    """`Captioner(decode_attention="triton")` through transformers' AttentionInterface: the kernel takes every
    decoding step of every layer (the prompt stays with SDPA), with either KV cache, and the captions are SDPA's."""
    from streamsynth.captions.captioners import load_captioner
    from streamsynth.kernels import decode_attention as module

    calls = []
    kernel = module.decode_attention
    monkeypatch.setattr(module, "decode_attention", lambda *args: calls.append(args[0].shape) or kernel(*args))
    captioner = load_captioner(blip2_model, device="cpu", kv_cache="dynamic")
    pixels = torch.randn(3, 3, captioner.preprocessor.size, captioner.preprocessor.size,
                         generator=torch.Generator().manual_seed(0))
    expected = captioner.caption(pixels)
    assert calls == [] and "decode_attention" not in captioner.settings
    layers = captioner.model.config.text_config.num_hidden_layers
    for kv_cache in ("dynamic", "graphed"):
        captioner.kv_cache, captioner.decode_attention = kv_cache, "triton"
        calls.clear()
        assert captioner.caption(pixels) == expected
        assert len(calls) == layers * (captioner.max_new_tokens - 1) and set(calls) == {(3, 4, 1, 8)}
        assert captioner.settings["decode_attention"] == "triton"  # a store records it, as it records TF32
        captioner.decode_attention = "sdpa"  # back to the model's own attention
        calls.clear()
        assert captioner.caption(pixels) == expected and calls == []
    with pytest.raises(ValueError, match="choose one of"):
        captioner.decode_attention = "flash"
    # caption-bench's timing of one layer's decoding attention takes the kernel beside SDPA's backends where it runs
    from streamsynth.benchmarks.caption_bench import decode_attention_ms

    timings = decode_attention_ms(captioner, batch_size=2)
    assert timings["triton"] > 0 and timings["math"] > 0


# Switches and fallback

def test_switched_off_kernel_runs_reference():
    x = torch.randn(2, 40, 5, 5, dtype=torch.float16)
    with disabled("group_norm"):
        assert torch.equal(group_norm(x, 8, silu=True), group_norm_reference(x, 8, None, None, 1e-5, True))
    with pytest.raises(ValueError, match="unknown kernel"):
        set_enabled("layer_norm", False)


def test_cpu_without_interpreter_falls_back_and_logs_once(tmp_path):
    script = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.DEBUG)\n"
        "from streamsynth.kernels.group_norm import group_norm, group_norm_reference\n"
        "x = torch.randn(2, 40, 5, 5)\n"
        "for _ in range(2): assert torch.equal(group_norm(x, 8), group_norm_reference(x, 8, None, None, 1e-5, False))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("running the PyTorch reference on cpu") == 1


# Patched models

def load_unet_and_vae(model_folder):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    return (UNet2DConditionModel.from_pretrained(model_folder, subfolder="unet").eval(),
            AutoencoderKL.from_pretrained(model_folder, subfolder="vae").eval())


@torch.no_grad()
def test_patched_unet_and_vae_match_unpatched(tiny_model):
    unet, vae = load_unet_and_vae(tiny_model)
    generator = torch.Generator().manual_seed(0)
    latents, text = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 77, 32, generator=generator)
    keys = set(unet.state_dict())
    expected_noise = unet(latents, 500, encoder_hidden_states=text).sample
    expected_images = vae.decode(latents[:1]).sample  # one image: the interpreted VAE is the slow part

    counts = patch(unet)
    assert counts == patch(unet), "patching twice must change nothing"
    assert counts["group_norm_silu"] > 0 and counts["geglu"] > 0 and counts["time_embedding_silu"] > 0
    assert set(unet.state_dict()) == keys
    torch.testing.assert_close(unet(latents, 500, encoder_hidden_states=text).sample, expected_noise, atol=1e-5, rtol=1e-5)
    with disabled("group_norm", "geglu"):  # switched off, the patched model runs the very modules it replaced
        assert torch.equal(unet(latents, 500, encoder_hidden_states=text).sample, expected_noise)
    unpatch(unet)
    assert not is_patched(unet)
    assert torch.equal(unet(latents, 500, encoder_hidden_states=text).sample, expected_noise)

    assert patch(vae)["group_norm_silu"] > 0
    torch.testing.assert_close(vae.decode(latents[:1]).sample, expected_images, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_patched_unet_matches_in_channels_last(tiny_model):
    unet, _ = load_unet_and_vae(tiny_model)
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    expected = unet(latents, 10, encoder_hidden_states=text).sample
    unet.to(memory_format=torch.channels_last)
    patch(unet)
    actual = unet(latents.contiguous(memory_format=torch.channels_last), 10, encoder_hidden_states=text).sample
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheduler", ["pndm", "ddim"])
def test_fused_step_in_a_full_sampling_run_matches_the_loop(tiny_model, scheduler):
    from streamsynth.synth import SynthesisConfig, Synthesizer, load_pipeline

    config = SynthesisConfig(num_inference_steps=5, guidance_scale=1.5)
    plain = Synthesizer(load_pipeline(tiny_model, scheduler=scheduler), config)
    pipe = load_pipeline(tiny_model, scheduler=scheduler)
    fused = Synthesizer(pipe, config, fused_step=FusedGuidedStep(pipe.scheduler))
    prompts, seeds = ["a photo of tench, a fish", "a photo of church"], [1, 2]
    assert torch.equal(fused.generate(prompts, seeds), plain.generate(prompts, seeds))


@pytest.mark.slow
@torch.no_grad()
def test_patched_unet_compiles_as_one_graph(tiny_model):
    """The kernels are PyTorch operators: torch.compile traces the patched UNet with no graph break at them."""
    unet, _ = load_unet_and_vae(tiny_model)
    patch(unet)
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    expected = unet(latents, 10, encoder_hidden_states=text).sample
    torch._dynamo.reset()
    compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break is an error
    torch.testing.assert_close(compiled(latents, 10, encoder_hidden_states=text).sample, expected, atol=1e-5,
                               rtol=1e-5)
    with disabled("group_norm", "geglu"):  # read when tracing: the compiled model follows the switch
        unfused = unet(latents, 10, encoder_hidden_states=text).sample
        torch.testing.assert_close(compiled(latents, 10, encoder_hidden_states=text).sample, unfused, atol=0, rtol=0)


def test_kernel_bench_compares_each_workload_with_its_reference(monkeypatch):
    from streamsynth.benchmarks import kernel_bench as bench
    from streamsynth.kernels import guided_step

    results = bench.bench("cpu", torch.float32, warmup=0, repeats=1, only="guided_step")
    assert len(results) == 14 and {r.kernel for r in results} == {"guided_step"}
    assert all(r.within_tolerance and r.max_abs_error == 0 for r in results)  # bit-exact on the CPU interpreter
    assert all(r.kernel_ms > 0 and r.reference_ms > 0 and r.kernel_gb_per_s > 0 for r in results)

    fused_update = guided_step.fused_update

    def off_by_a_little(*args, **kwargs):
        prev, eps = fused_update(*args, **kwargs)
        return prev + 1e-3, eps

    image = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert bench.within_tolerance(image, image) and not bench.within_tolerance(image // 2, image)
    one_off = image.clone()
    one_off.view(-1)[:3] = one_off.view(-1)[:3] ^ 1  # 3 of 384 pixels one level away: within
    assert bench.within_tolerance(one_off, image) and not bench.within_tolerance(image ^ 1, image)

    monkeypatch.setattr(guided_step, "fused_update", off_by_a_little)
    results = bench.bench("cpu", torch.float32, warmup=0, repeats=1, only="guided_step")
    assert not any(r.within_tolerance for r in results) and "14 outside tolerance" in bench.format_results(results)
    assert all(r.kernel_error_vs_exact is None for r in results)  # fp32 is checked against its reference alone


def test_a_kernel_as_close_to_the_exact_result_as_its_fp16_reference_agrees():
    from streamsynth.benchmarks.kernel_bench import agrees

    step, half = 2.0 ** -9, torch.float16  # fp16's spacing in [2, 4)
    exact = torch.tensor([2.0, 1.0], dtype=torch.float64)
    reference = torch.tensor([2.0 + 8 * step, 1.0], dtype=half)
    closer = torch.tensor([2.0 + 4 * step, 1.0], dtype=half)
    as_far = torch.tensor([2.0 - 8 * step, 1.0], dtype=half)
    farther = torch.tensor([2.0 + 16 * step, 1.0], dtype=half)
    assert not any(agrees(out, reference) for out in (closer, as_far, farther))  # > 2e-3 + 2e-3 x 2 from it
    assert agrees(closer, reference, exact, half) and agrees(as_far, reference, exact, half)
    assert not agrees(farther, reference, exact, half) and not agrees(closer, reference, exact)  # no dtype: no slack
    assert agrees(reference, reference, exact, half)
