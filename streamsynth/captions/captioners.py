"""Captioning models loaded through transformers' `from_pretrained`: BLIP-2 (default), BLIP, VisionEncoderDecoder.

The architecture is read from the checkpoint's config (`model_type`), so a hub id and a local folder load the same
way. Decoding follows the reference recipe unless told otherwise: greedy, at most 16 new tokens.

A `Captioner` has two halves: `preprocessor` (picklable, runs in DataLoader workers: PIL image → pixel tensor) and
`caption` (runs in the main process on the device: pixel batch → strings).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image

from .graphed import GraphedGreedyDecoder, unsupported_reason

DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b"
REFERENCE_MAX_NEW_TOKENS = 16
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SUPPORTED_MODEL_TYPES = ("blip-2", "blip", "vision-encoder-decoder")
# How CUDA multiplies fp32 matrices (PyTorch's names): "ieee", full fp32, PyTorch's default; "tf32", tensor cores with
# 10-bit mantissas. A model loaded in fp16 keeps some parts in fp32 (BLIP-2: the Q-Former); only those are affected.
FP32_MATMULS = ("ieee", "tf32")
# The language model's attention in a decoding step: transformers' SDPA, or streamsynth's kernel for one query token
# (`streamsynth.kernels.decode_attention`; BLIP-2 with a decoder-only language model, on CUDA).
DECODE_ATTENTIONS = ("sdpa", "triton")
# How the decoder keeps its keys and values: "dynamic", transformers' default, grown by concatenation every token;
# "static", preallocated, with which transformers compiles the decoding step on CUDA; "graphed", static with
# streamsynth's greedy loop replaying the step from a CUDA graph (BLIP-2 with a decoder-only LM: `graphed.py`).
# The captions are the same; which is fastest is measured by `caption-bench --kv-cache dynamic,static,graphed`.
KV_CACHES = ("auto", "dynamic", "static", "graphed")  # auto: default_kv_cache


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere, unless `dtype` ("fp16", "bf16", "fp32") says otherwise."""
    if dtype is None:
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class ImagePreprocessor:
    """The model's own image processor, applied to one RGB image; cheap to pickle into workers."""

    image_processor: object
    dtype: torch.dtype

    @property
    def size(self) -> int:
        """The side the processor resizes to (used to decode JPEGs at a reduced scale)."""
        size = getattr(self.image_processor, "size", None) or {}
        if isinstance(size, int):
            return size
        size = dict(size)
        return int(size.get("shortest_edge") or min(size.get("height", 224), size.get("width", 224)))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        # Cast in the worker: half-precision batches cost half the inter-process and host-to-device traffic.
        return pixels.to(self.dtype)


def default_kv_cache(model: torch.nn.Module, device: torch.device) -> str:
    """The KV cache kind "auto" stands for: graphed decoding on CUDA for a model it can decode (BLIP-2 with a
    decoder-only language model), else transformers' dynamic cache. Both give the same captions; on an H200 graphed
    decoding captioned 8,192 images 3-7% faster than the dynamic cache at batch 512 (2,048 images: 10-12%)."""
    return "graphed" if device.type == "cuda" and unsupported_reason(model) is None else "dynamic"


class Captioner:
    """A captioning model and its tokenizer, on one device, with fixed decoding settings."""

    def __init__(
        self,
        model: torch.nn.Module,
        image_processor,
        tokenizer,
        *,
        name: str,
        device: str | torch.device,
        dtype: torch.dtype,
        prompt: str | None = None,
        max_new_tokens: int = REFERENCE_MAX_NEW_TOKENS,
        kv_cache: str = "auto",
        fp32_matmul: str = "ieee",
        decode_attention: str = "sdpa",
    ):
        if fp32_matmul not in FP32_MATMULS:
            raise ValueError(f"unknown fp32 matmul precision {fp32_matmul!r}: choose one of {list(FP32_MATMULS)}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device)
        self.dtype = dtype
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        # TF32 for BLIP-2's fp32 Q-Former measured 4.8x faster on an H200 (0.14 -> 0.03 s for 512 images), a tenth of
        # a batch; captions may differ in rare tokens, so it is recorded in the store's settings and off by default.
        self.fp32_matmul = fp32_matmul
        self.model_type = model.config.model_type
        self.preprocessor = ImagePreprocessor(image_processor, dtype)
        if prompt and self.model_type != "blip-2":
            raise ValueError(f"--caption-prefix is supported for BLIP-2 models only; {name} is a {self.model_type} model")
        self._prefix = self._prefix_ids()
        self._graphed = None  # the GraphedGreedyDecoder of kv_cache "graphed", with its caches and graphs
        self.kv_cache = kv_cache
        self._decode_attention = "sdpa"
        self.decode_attention = decode_attention

    @property
    def kv_cache(self) -> str:
        """How the decoder keeps its keys and values: one of KV_CACHES but "auto", which is resolved when set."""
        return self._kv_cache

    @kv_cache.setter
    def kv_cache(self, kind: str) -> None:
        if kind not in KV_CACHES:
            raise ValueError(f"unknown KV cache kind {kind!r}: choose one of {list(KV_CACHES)}")
        if kind == "auto":
            kind = default_kv_cache(self.model, self.device)
        self._kv_cache = kind
        if kind == "graphed":
            self._graphed_decoder()  # refuses a model it cannot decode now, not at the first batch
        else:
            self._graphed = None  # its static caches hold gigabytes at large batches

    @property
    def decode_attention(self) -> str:
        """The language model's attention (one of DECODE_ATTENTIONS): "sdpa", the model's own as loaded (transformers'
        SDPA by default); "triton", streamsynth's kernel for one query token in every decoding step and transformers'
        SDPA for the prompt (`kernels.decode_attention`)."""
        return self._decode_attention

    @decode_attention.setter
    def decode_attention(self, kind: str) -> None:
        if kind not in DECODE_ATTENTIONS:
            raise ValueError(f"unknown decode attention {kind!r}: choose one of {list(DECODE_ATTENTIONS)}")
        if kind == self._decode_attention:
            return
        if self.model_type != "blip-2" or self.model.config.text_config.is_encoder_decoder:
            raise ValueError(f"--decode-attention {kind} is for BLIP-2 with a decoder-only language model (e.g. OPT); "
                             f"{self.name} is a {self.model_type} model: leave it at sdpa")
        from ..kernels.decode_attention import register_with_transformers

        language_model = self.model.language_model
        if kind == "triton":
            self._loaded_attention = language_model.config._attn_implementation
            language_model.set_attn_implementation(register_with_transformers())
        else:
            language_model.set_attn_implementation(self._loaded_attention)
        self._decode_attention = kind
        self._graphed = None  # its CUDA graphs replay the attention they captured

    @property
    def prompt_length(self) -> int:
        """Tokens BLIP-2's language model is given before it generates (query outputs, BOS, the prompt); 0 for
        other architectures."""
        return 0 if self._prefix is None else self._prefix.numel()

    def _prefix_ids(self) -> torch.Tensor | None:
        """The token ids BLIP-2 is given before generating: image placeholders, BOS, then the prompt.

        This is what `Blip2Processor` builds from an image and a prompt; building it once here keeps the
        tokenizer out of the per-batch path. Other architectures start from their own decoder start token.
        """
        if self.model_type != "blip-2":
            return None
        config = self.model.config
        if config.image_token_index is None:
            raise ValueError(
                f"{self.name}: its config has no image_token_index (a BLIP-2 checkpoint saved by an old transformers); "
                "re-save it with a current transformers or use the updated hub checkpoint"
            )
        ids = [config.image_token_index] * config.num_query_tokens
        prompt_ids = self.tokenizer(self.prompt or "", add_special_tokens=False)["input_ids"]
        if not config.text_config.is_encoder_decoder:
            ids.append(config.text_config.bos_token_id)
        return torch.tensor(ids + prompt_ids, dtype=torch.long, device=self.device)

    @property
    def settings(self) -> dict:
        """What made the captions, recorded in the store's metadata."""
        settings = {
            "model": self.name,
            "model_type": self.model_type,
            "prompt": self.prompt,
            "decoding": "greedy",
            "max_new_tokens": self.max_new_tokens,
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        if self.fp32_matmul != "ieee":  # only when set: stores made before the option existed resume unchanged
            settings["fp32_matmul"] = self.fp32_matmul
        if self.decode_attention != "sdpa":  # likewise: another attention may round a rare token the other way
            settings["decode_attention"] = self.decode_attention
        return settings

    def _graphed_decoder(self):
        if self._graphed is None:
            self._graphed = GraphedGreedyDecoder(self.model)  # refuses a model it cannot decode, in one line
        return self._graphed

    @torch.inference_mode()
    def caption(self, pixel_values: torch.Tensor, max_new_tokens: int | None = None) -> list[str]:
        """Greedy captions for a batch of preprocessed images, of at most `max_new_tokens` (default: the captioner's)."""
        pixel_values = pixel_values.to(self.device, self.dtype, non_blocking=True)
        max_new_tokens = max_new_tokens or self.max_new_tokens
        input_ids = None if self._prefix is None else self._prefix.expand(pixel_values.shape[0], -1)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        if self.kv_cache == "static":
            kwargs["cache_implementation"] = "static"
        with fp32_matmul_precision(self.fp32_matmul, self.device):
            if self.kv_cache == "graphed":
                output = self._graphed_decoder().generate(pixel_values, input_ids, max_new_tokens)
                skip = input_ids.shape[1]
            elif input_ids is not None:
                output = self.model.generate(
                    pixel_values=pixel_values, input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs
                )
                # A decoder-only language model returns its input followed by the new tokens.
                skip = 0 if self.model.config.text_config.is_encoder_decoder else input_ids.shape[1]
            else:
                output = self.model.generate(pixel_values=pixel_values, **kwargs)
                skip = 1  # the decoder's start token
        texts = self.tokenizer.batch_decode(output[:, skip:], skip_special_tokens=True)
        return [text.strip() for text in texts]


@contextmanager
def fp32_matmul_precision(precision: str, device: torch.device):
    """CUDA's fp32 matrix multiplies at `precision` ("ieee" or "tf32") inside the block, then as they were.

    Elsewhere (the CPU) nothing changes: TF32 is a CUDA tensor-core format.
    """
    if precision == "ieee" or device.type != "cuda":
        yield
        return
    kept = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = kept


def model_type_of(model: str | os.PathLike) -> str:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot load a model config from {model}: {err}\n"
            "give a hub id (e.g. Salesforce/blip2-opt-2.7b) or a folder written by save_pretrained"
        ) from None
    return config.model_type


def load_captioner(
    model: str | os.PathLike = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | None = None,
    prompt: str | None = None,
    max_new_tokens: int = REFERENCE_MAX_NEW_TOKENS,
    kv_cache: str = "auto",
    fp32_matmul: str = "ieee",
    decode_attention: str = "sdpa",
) -> Captioner:
    """Load a BLIP-2, BLIP or VisionEncoderDecoder captioner with `from_pretrained` (hub id or local folder)."""
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        Blip2ForConditionalGeneration,
        BlipForConditionalGeneration,
        VisionEncoderDecoderModel,
    )

    model_classes = {
        "blip-2": Blip2ForConditionalGeneration,
        "blip": BlipForConditionalGeneration,
        "vision-encoder-decoder": VisionEncoderDecoderModel,
    }
    model_type = model_type_of(model)
    if model_type not in model_classes:
        raise ValueError(
            f"{model} is a {model_type!r} model; streamsynth captions with {', '.join(SUPPORTED_MODEL_TYPES)} "
            "models (e.g. Salesforce/blip2-opt-2.7b, Salesforce/blip-image-captioning-large, "
            "nlpconnect/vit-gpt2-image-captioning)"
        )
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    network = model_classes[model_type].from_pretrained(model, dtype=torch_dtype).to(device)
    return Captioner(
        network,
        AutoImageProcessor.from_pretrained(model),
        AutoTokenizer.from_pretrained(model),
        name=str(model),
        device=device,
        dtype=torch_dtype,
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        kv_cache=kv_cache,
        fp32_matmul=fp32_matmul,
        decode_attention=decode_attention,
    )
