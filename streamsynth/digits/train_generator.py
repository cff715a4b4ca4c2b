"""Train the shipped digits generator: a tiny Stable Diffusion (SD1.5's component classes) on the training digits.

    streamsynth train-digits-generator --out streamsynth/data/digits-sd     # about 35 min on 2 CPU cores

Two stages, as latent diffusion is trained:

1. the VAE (`AutoencoderKL`) learns to reconstruct the 8x8 training digits (mean squared error plus a small KL
   term); its `scaling_factor` is then set so that the latents it hands the UNet have unit standard deviation
   (SD1.5's 0.18215 is the same quantity for its VAE);
2. the UNet (`UNet2DConditionModel`) and the CLIP text encoder learn together, from scratch, to predict the noise
   added to those latents (the epsilon objective, DDPM noise at timesteps drawn uniformly from SD1.5's 1,000-step
   scaled-linear schedule), conditioned on the text of each image's prompt: 80% the Caption-in-Prompt prompt
   "a photo of {name}, {caption}" with the describer's caption of that very digit, 10% the basic prompt
   "a photo of {name}", 10% the empty prompt (so that classifier-free guidance has an unconditional model). An
   exponential moving average of the weights is what ships.

Only the training part of the digits (images 0..1296) is used; the held-out test part never is. Everything is seeded
by `--seed`. The result is saved with `save_pretrained` (fp16 safetensors, a few MB), with `streamsynth_model.json`
beside it: the settings, the loss curves and the training time.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import CLASS_NAMES, DESCRIBER, TRAIN_COUNT, describe_digit, digit_pixels, digit_targets, train_indices
from ..prompts.templates import prompt_template
from .model import DIGITS_MODEL_VERSION, MODEL_CARD, build_digits_pipeline


@dataclass
class GeneratorSettings:
    """How the digits generator is trained (each a flag of `streamsynth train-digits-generator`)."""

    seed: int = 0
    threads: int = 1  # one thread per process is the faster choice on a busy 2-core machine
    vae_steps: int = 1000
    vae_batch_size: int = 128
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6  # times the KL divergence summed over a latent (64 values), beside the per-pixel MSE
    unet_steps: int = 4000
    unet_batch_size: int = 128
    unet_lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 1e-2
    empty_prompt_share: float = 0.1
    basic_prompt_share: float = 0.1
    ema_decay: float = 0.999
    log_every: int = 50


def training_images() -> torch.Tensor:
    """The training part as the VAE sees it: (1297, 3, 8, 8) in [-1, 1] (grey in three equal channels)."""
    part = train_indices()
    pixels = torch.from_numpy(digit_pixels()[part.start:part.stop].copy())
    return (pixels * 2 - 1)[:, None].expand(-1, 3, -1, -1).contiguous()


def training_prompts() -> tuple[list[str], list[str]]:
    """(CiP prompt, basic prompt) of each training image, made by the stream's own prompt strategies."""
    cip, basic = prompt_template("cip"), prompt_template("basic")
    pixels, targets = digit_pixels(), digit_targets()
    names = [CLASS_NAMES[targets[i]] for i in train_indices()]
    captions = [describe_digit(pixels[i]) for i in train_indices()]
    return [cip(n, c) for n, c in zip(names, captions)], [basic(n) for n in names]


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # cosine down to a tenth


class _Log:
    def __init__(self, stage: str, every: int):
        self.stage, self.every, self.rows, self._sum, self._n = stage, every, [], 0.0, 0
        self.start_wall, self.start_cpu = time.perf_counter(), time.process_time()

    def add(self, step: int, loss: float, **extra: float) -> None:
        self._sum += loss
        self._n += 1
        if (step + 1) % self.every == 0:
            row = {"step": step + 1, "loss": self._sum / self._n, **extra,
                   "wall_s": round(time.perf_counter() - self.start_wall, 1)}
            self.rows.append(row)
            print(f"{self.stage} step {row['step']}: loss {row['loss']:.5f} ({row['wall_s']:.0f} s)", flush=True)
            self._sum, self._n = 0.0, 0

    def summary(self) -> dict:
        return {"wall_s": round(time.perf_counter() - self.start_wall, 1),
                "cpu_s": round(time.process_time() - self.start_cpu, 1),
                "final_loss": self.rows[-1]["loss"] if self.rows else None, "curve": self.rows}


def train_vae(vae, images: torch.Tensor, s: GeneratorSettings, generator: torch.Generator) -> dict:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    log = _Log("vae", s.log_every)
    vae.train()
    for step in range(s.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, s.vae_steps, s.vae_lr, min(s.warmup_steps, s.vae_steps // 10 + 1))
        batch = images[torch.randint(len(images), (s.vae_batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        mse = F.mse_loss(reconstruction, batch)
        loss = mse + s.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        log.add(step, loss.item(), mse=round(mse.item(), 6))
    vae.eval()
    return log.summary()


@torch.no_grad()
def latent_statistics(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    posterior = vae.encode(images).latent_dist
    return posterior.mean, posterior.std


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids exactly as `Synthesizer.encode_text` makes them (padded to the tokenizer's maximum length)."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def prompt_mix(ids: dict[str, torch.Tensor], index: torch.Tensor, u: torch.Tensor,
               s: GeneratorSettings) -> torch.Tensor:
    """The token ids each image of a batch is trained with: the empty prompt where its uniform draw `u` is below
    `empty_prompt_share`, its basic prompt where it is below the two shares together, else its Caption-in-Prompt
    prompt. `ids`: "cip" and "basic" (one row per training image) and "empty" (one row); `index`: the batch's
    images."""
    u = u[:, None]
    return torch.where(u < s.empty_prompt_share, ids["empty"][None],
                       torch.where(u < s.empty_prompt_share + s.basic_prompt_share, ids["basic"][index],
                                   ids["cip"][index]))


def train_unet(pipe, mean: torch.Tensor, std: torch.Tensor, s: GeneratorSettings, generator: torch.Generator):
    """Trains UNet and text encoder together; returns their EMA copies and the log."""
    from diffusers import DDPMScheduler
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    scaling = pipe.vae.config.scaling_factor
    cip, basic = training_prompts()
    ids = {"cip": tokenize(tokenizer, cip), "basic": tokenize(tokenizer, basic), "empty": tokenize(tokenizer, [""])[0]}
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=s.unet_lr, weight_decay=s.weight_decay)
    ema = [AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(s.ema_decay), use_buffers=False)
           for m in (unet, text_encoder)]
    log = _Log("unet", s.log_every)
    unet.train()
    text_encoder.train()
    for step in range(s.unet_steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, s.unet_steps, s.unet_lr, s.warmup_steps)
        index = torch.randint(len(mean), (s.unet_batch_size,), generator=generator)
        latents = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)) * scaling
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(noise_schedule.config.num_train_timesteps, (len(index),), generator=generator)
        noisy = noise_schedule.add_noise(latents, noise, timesteps)
        tokens = prompt_mix(ids, index, torch.rand(len(index), generator=generator), s)
        text = text_encoder(tokens)[0]
        prediction = unet(noisy, timesteps, encoder_hidden_states=text).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        for averaged, model in zip(ema, (unet, text_encoder)):
            averaged.update_parameters(model)
        log.add(step, loss.item())
    return [averaged.module.eval() for averaged in ema], log.summary()


def train_generator(out: str | os.PathLike, settings: GeneratorSettings | None = None, overwrite: bool = False) -> Path:
    """Train the digits generator and save it (fp16 safetensors, `save_pretrained`) to `out`."""
    import diffusers
    import transformers

    s = settings or GeneratorSettings()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: choose another --out or pass --overwrite")
    torch.set_num_threads(s.threads)
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    generator = torch.Generator().manual_seed(s.seed)
    pipe = build_digits_pipeline(seed=s.seed)
    images = training_images()

    vae_log = train_vae(pipe.vae, images, s, generator)
    mean, std = latent_statistics(pipe.vae, images)
    sampled = mean + std * torch.randn(mean.shape, generator=generator)
    pipe.vae.register_to_config(scaling_factor=float(1.0 / sampled.std()))
    with torch.no_grad():
        reconstruction = pipe.vae.decode(mean).sample
    vae_log["reconstruction_mse_of_means"] = float(F.mse_loss(reconstruction, images))
    vae_log["scaling_factor"] = pipe.vae.config.scaling_factor

    (unet, text_encoder), unet_log = train_unet(pipe, mean, std, s, generator)
    pipe.unet, pipe.text_encoder = unet, text_encoder
    pipe.register_modules(unet=unet, text_encoder=text_encoder)

    card = {
        "architecture": DIGITS_MODEL_VERSION,
        "random_weights": False,
        "what": "a tiny text-to-image model with Stable Diffusion's component classes, trained on 8x8 handwritten "
                "digits (UCI optical-recognition digits); not Stable Diffusion",
        "data": f"UCI optical-recognition digits (test part), training part: images 0..{TRAIN_COUNT - 1}",
        "captions": DESCRIBER,
        "settings": asdict(s),
        "parameters": {name: sum(p.numel() for p in getattr(pipe, name).parameters())
                       for name in ("unet", "vae", "text_encoder")},
        "vae": vae_log,
        "unet": unet_log,
        "total_wall_s": round(time.perf_counter() - started_wall, 1),
        "total_cpu_s": round(time.process_time() - started_cpu, 1),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "processor": platform.processor()
                    or platform.machine(), "torch": torch.__version__, "diffusers": diffusers.__version__,
                    "transformers": transformers.__version__},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.to(torch.float16).save_pretrained(staging, safe_serialization=True)
        (staging / MODEL_CARD).write_text(json.dumps(card, indent=1) + "\n")
        for path in [staging, *staging.rglob("*")]:  # mkdtemp and the writers make owner-only files
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"saved {out}: {card['total_wall_s']:.0f} s wall, final losses: VAE {vae_log['final_loss']:.5f}, "
          f"UNet {unet_log['final_loss']:.5f}", flush=True)
    return out


def plot_loss_curves(folder: str | os.PathLike, png: str | os.PathLike) -> Path:
    """The VAE's and the UNet's training loss, from a trained model's `streamsynth_model.json`, as a PNG."""
    from matplotlib.figure import Figure

    card = json.loads((Path(folder) / MODEL_CARD).read_text())
    fig = Figure(figsize=(9, 3.2), dpi=100, layout="constrained")
    for ax, stage, what in zip(fig.subplots(1, 2), ("vae", "unet"),
                               ("VAE: MSE + KL", "UNet + text encoder: noise MSE")):
        curve = card[stage]["curve"]
        ax.plot([row["step"] for row in curve], [row["loss"] for row in curve])
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{what} (mean of {card['settings']['log_every']} steps)", fontsize=9)
        ax.grid(alpha=0.3)
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    return png
