"""Sana: a linear-attention diffusion transformer trained by flow matching, on Gemma 2's encoding of the prompt, with
a deep-compression autoencoder (DC-AE: 32x spatial compression to 32 channels, so a 1024² image is 32x32 tokens).

As `SanaPipeline` samples: prompts lower-cased and stripped; each follows the pipeline's default instruction prefix
(its `complex_human_instruction`, read from diffusers' own signature), the whole padded on the right and cut to the
prefix's tokens + 300 - 2, of which the first token and the last 299 reach the transformer with their attention mask;
the unconditional branch from the empty prompt without the prefix, 300 tokens; latents in fp32 whatever the model's
dtype, the transformer's input and output cast to and from its dtype, its timestep scaled by `timestep_scale`; the
DPM-Solver++ scheduler on flow sigmas with its shift; no noise sigma, no `scale_model_input`. Resolution binning is not
applied (see `pixart`). No tiny decoder decodes DC-AE latents. Sana-Sprint's few-step sampling is another pipeline
(`SanaSprintPipeline`, not supported).
"""

from __future__ import annotations

import torch

from .base import Conditioning, Family, TextEncoder, call_default, masked_states, noise_half


class Sana(Family):
    name = "Sana"
    key = "sana"
    pipeline_classes = ("SanaPipeline",)
    denoiser_attribute = "transformer"
    schedulers = ("dpm++",)  # its own class: DPM-Solver++ built from its config keeps the flow sigmas
    sigma_scaled_inputs = False
    reference_call_options = {"use_resolution_binning": False}

    def text_encoders(self, pipe) -> list[TextEncoder]:
        return [TextEncoder("Gemma 2", call_default(pipe, "max_sequence_length") - 2)]

    def latent_dtype(self, pipe) -> torch.dtype:
        return torch.float32

    @torch.no_grad()
    def encode(self, pipe, prompts: list[str]) -> Conditioning:
        instruction = call_default(pipe, "complex_human_instruction")
        prefix = "\n".join(instruction) if instruction else ""
        length = call_default(pipe, "max_sequence_length")
        tokens = len(pipe.tokenizer.encode(prefix)) + length - 2 if prefix else length
        states, mask = self._gemma_states(pipe, prompts, tokens, prefix)
        kept = [0, *range(-length + 1, 0)]  # the first token (<bos>) and the last length - 1
        return {"prompt": states[:, kept], "mask": mask[:, kept]}

    def encode_unconditional(self, pipe) -> Conditioning:
        states, mask = self._gemma_states(pipe, [""], call_default(pipe, "max_sequence_length"), "")
        return {"prompt": states, "mask": mask}

    def _gemma_states(self, pipe, prompts: list[str], length: int, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        pipe.tokenizer.padding_side = "right"  # as the pipeline sets it: Gemma's tokenizer pads on the left
        return masked_states(pipe, prompts, length, self.name, "Gemma 2", prefix)

    def predict(self, pipe, latents: torch.Tensor, t: torch.Tensor, text: Conditioning) -> torch.Tensor:
        transformer = pipe.transformer
        timestep = t.expand(len(latents)) * transformer.config.timestep_scale
        output = transformer(latents.to(transformer.dtype),
                             encoder_hidden_states=text["prompt"].to(transformer.dtype),
                             encoder_attention_mask=text["mask"], timestep=timestep, return_dict=False)[0].float()
        return noise_half(transformer, output)

    def build_random(self, size: str, device: torch.device):
        """Tiny: a one-layer Gemma 2 of width 16, a two-block Sana transformer, a six-stage DC-AE of 8-16 channels
        (32x, as Sana's: 64x64 images from 2x2 latents); native: Sana 1600M at 1024² with Gemma-2-2B and DC-AE
        f32c32, as published."""
        from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
        from transformers import Gemma2Config, Gemma2Model

        from ..tiny import character_gemma_tokenizer

        tokenizer = character_gemma_tokenizer()
        tiny = size == "tiny"
        with torch.device(device):
            if tiny:
                text_encoder = Gemma2Model(Gemma2Config(vocab_size=len(tokenizer), **TINY_GEMMA))
            else:
                text_encoder = Gemma2Model(Gemma2Config(**GEMMA_2_2B))
            transformer = SanaTransformer2DModel(**(TINY_TRANSFORMER if tiny else TRANSFORMER))
            vae = AutoencoderDC(**(TINY_AUTOENCODER if tiny else AUTOENCODER))
        return SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                            scheduler=DPMSolverMultistepScheduler(**SCHEDULER))


# Sana 1600M 1024px's transformer, Gemma-2-2B, DC-AE f32c32 (Sana 1.0's) and the scheduler, as published.
TRANSFORMER = dict(
    in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
    num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304,
    mlp_ratio=2.5, sample_size=32, patch_size=1,
)
GEMMA_2_2B = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256,
)
AUTOENCODER = dict(
    in_channels=3, latent_channels=32, encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)), decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407,
)
SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", algorithm_type="dpmsolver++",
                 solver_order=2, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
TINY_TRANSFORMER = dict(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
    num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
    mlp_ratio=2.5, sample_size=2, patch_size=1,
)
TINY_GEMMA = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8)
TINY_AUTOENCODER = dict(
    in_channels=3, latent_channels=4, attention_head_dim=8,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(8, 8, 8, 16, 16, 16), decoder_block_out_channels=(8, 8, 8, 16, 16, 16),
    encoder_layers_per_block=(1,) * 6, decoder_layers_per_block=(1,) * 6,
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)), decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    downsample_block_type="conv", upsample_block_type="interpolate", scaling_factor=0.41407,
)

FAMILY = Sana()
