"""BLIP-2 architectures as config data, built with random weights for benchmarks and tests.

Random weights give the released checkpoint's FLOPs and memory traffic without downloading it. The special tokens
(padding, BOS/EOS, image placeholder) are taken out of the output layer, so every caption is text and runs the full
`max_new_tokens`: an upper bound on the work of a real checkpoint, which stops at EOS. The tokenizer is byte-level
BPE with no merges, built offline.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ..seeding import seeded

# Blip2Config field names (transformers 5): vision_config = Blip2VisionConfig, qformer_config = Blip2QFormerConfig,
# text_config = OPTConfig. The values are those of Salesforce/blip2-opt-2.7b.
BLIP2_ARCHITECTURES: dict[str, dict] = {
    "blip2-opt-2.7b": {
        "vision_config": {
            "hidden_size": 1408, "num_hidden_layers": 39, "num_attention_heads": 16, "intermediate_size": 6144,
            "image_size": 224, "patch_size": 14,
        },
        "qformer_config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
        "num_query_tokens": 32,
        "text_config": {
            "model_type": "opt", "hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 32,
            "ffn_dim": 10240, "vocab_size": 50272, "word_embed_proj_dim": 2560, "max_position_embeddings": 2048,
        },
        "image_token_index": 50265,
    },
    # The same shapes at a few MB, for CPU dry runs and tests.
    "tiny": {
        "vision_config": {
            "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
            "image_size": 32, "patch_size": 8,
        },
        "qformer_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64},
        "num_query_tokens": 4,
        "text_config": {
            "model_type": "opt", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "ffn_dim": 64, "vocab_size": 261, "word_embed_proj_dim": 32, "max_position_embeddings": 128,
        },
        "image_token_index": 260,
    },
}
# BLIP-2's image statistics (those of CLIP) and input side.
_BLIP2_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
_BLIP2_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def byte_level_tokenizer(size: int = 260):
    """An OPT-style byte-level BPE tokenizer with no merges and `size` tokens: nothing is downloaded.

    Ids as in OPT: 0 `<s>`, 1 `<pad>`, 2 `</s>` (BOS and EOS), 3 `<unk>`, then the 256 byte symbols, then word tokens
    " w260", " w261", ... up to `size`: text never encodes to them, but every id a random model of a released vocabulary
    emits decodes to text (a caption of ids past the tokenizer would decode to nothing and be skipped as empty).
    """
    from transformers import GPT2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_symbols = bytes_to_unicode()
    tokens = ["<s>", "<pad>", "</s>", "<unk>", *byte_symbols.values()]
    space = byte_symbols[ord(" ")]
    tokens += [f"{space}w{n}" for n in range(len(tokens), size)]
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        merges.write_text("#version: 0.2\n")
        return GPT2Tokenizer(
            str(vocab), str(merges), bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
        )


def never_emit(model: torch.nn.Module, token_ids: list[int]) -> None:
    """Make a random model's output layer never choose `token_ids` (zero logits, or far below zero with a bias).

    An untrained model picks special tokens as often as any other, and a caption of padding and image placeholders
    decodes to nothing; a trained captioner never does that.
    """
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight[token_ids] = 0.0
        if getattr(head, "bias", None) is not None:
            head.bias[token_ids] = -1e4


def blip2_config(arch: str):
    from transformers import Blip2Config

    if arch not in BLIP2_ARCHITECTURES:
        raise ValueError(f"unknown BLIP-2 architecture {arch!r}: choose one of {sorted(BLIP2_ARCHITECTURES)}")
    spec = BLIP2_ARCHITECTURES[arch]
    text = dict(spec["text_config"], bos_token_id=2, eos_token_id=2, pad_token_id=1)
    return Blip2Config(
        vision_config=spec["vision_config"],
        qformer_config=spec["qformer_config"],
        text_config=text,
        num_query_tokens=spec["num_query_tokens"],
        image_token_index=spec["image_token_index"],
    )


def random_blip2(arch: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """(model, image processor, tokenizer) of a BLIP-2 architecture with random weights drawn from `seed`, built on
    `device`. Seeded, so that it is the same model whatever ran before: an unseeded tiny one may caption an image with
    blanks only."""
    from transformers import Blip2ForConditionalGeneration, BlipImageProcessor

    config = blip2_config(arch)
    # Built directly on the device: initialising 3.7 B parameters on the CPU first would take minutes.
    with torch.device(device):
        model = seeded(seed, Blip2ForConditionalGeneration, config)
    model = model.to(dtype)
    # from_pretrained keeps these parts (the Q-Former and its queries) in fp32; so does this random stand-in.
    for name in model._keep_in_fp32_modules or []:
        part = getattr(model, name)
        if isinstance(part, torch.nn.Parameter):
            part.data = part.data.float()
        else:
            part.float()
    # The image placeholder comes right after the base vocabulary, as in the released tokenizer.
    tokenizer = byte_level_tokenizer(config.image_token_index)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    assert tokenizer.convert_tokens_to_ids("<image>") == config.image_token_index
    # Special tokens and the output layer's padding past the tokenizer (OPT's 50272 rows for 50266 tokens).
    never_emit(model, [0, 1, 2, 3, *range(config.image_token_index, config.text_config.vocab_size)])
    side = config.vision_config.image_size
    image_processor = BlipImageProcessor(
        size={"height": side, "width": side}, image_mean=_BLIP2_IMAGE_MEAN, image_std=_BLIP2_IMAGE_STD
    )
    return model, image_processor, tokenizer


def save_random_blip2(arch: str, folder: str | os.PathLike, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """`random_blip2` (weights drawn from `seed`) saved as a checkpoint folder (model and `Blip2Processor`), as
    `streamsynth caption --captioner` loads a released one; unless already there. Written aside and renamed, so a
    killed write never looks complete."""
    import shutil

    from transformers import Blip2Processor

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model, image_processor, tokenizer = random_blip2(arch, device, dtype, seed)
    model.save_pretrained(staging)
    Blip2Processor(image_processor, tokenizer, num_query_tokens=model.config.num_query_tokens).save_pretrained(staging)
    os.replace(staging, folder)
    return folder
