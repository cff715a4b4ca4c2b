"""Attention for one query token over a KV cache: a language model's decoding step, one kernel per (batch, head).

On an H200, BLIP-2 OPT-2.7b's decoding step for 512 captions spent two thirds of its time (0.19 of 0.29 s a batch)
in cuDNN's fused attention on one query token over 49 cached keys: about 0.4 ms a layer where reading the keys and
values once takes about 0.05 ms. With one query there is no matrix to multiply: each program reads its head's
query, keys and values once, takes the scores, an online softmax and the weighted values in fp32, and rounds the
output once.

`transformers_attention` is the same as an attention function of transformers' `AttentionInterface`, registered as
`ATTENTION_NAME`: a query of one token runs the kernel, anything else (a prompt's prefill) transformers' SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import check_float_dtype, check_same_device, runs_triton

ATTENTION_NAME = "streamsynth_decode"  # the name registered with transformers (`register_with_transformers`)


def decode_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """`F.scaled_dot_product_attention` as transformers calls it: keys and values shared by groups of query heads
    are repeated, the mask is additive (float) or says which keys are seen (bool)."""
    group = query.shape[1] // key.shape[1]
    if group > 1:
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


def _check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> None:
    if query.dim() != 4 or query.shape[2] != 1:
        raise ValueError(f"decode_attention expects a query of one token (batch, heads, 1, head_dim), got shape "
                         f"{tuple(query.shape)}: use F.scaled_dot_product_attention for longer queries")
    batch, heads, _, head_dim = query.shape
    if key.shape != value.shape or key.dim() != 4 or key.shape[0] != batch or key.shape[3] != head_dim \
            or heads % key.shape[1]:
        raise ValueError(f"decode_attention: keys {tuple(key.shape)} and values {tuple(value.shape)} must both be "
                         f"(batch, key heads dividing {heads}, keys, {head_dim}) for the query {tuple(query.shape)}")
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        check_float_dtype(name, tensor)
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(f"decode_attention: query, key and value have dtypes {query.dtype}, {key.dtype}, "
                         f"{value.dtype}: convert them to one dtype")
    if mask is not None:
        try:
            torch.broadcast_shapes(mask.shape, (batch, heads, 1, key.shape[2]))
        except RuntimeError:
            raise ValueError(f"decode_attention: mask of shape {tuple(mask.shape)} does not broadcast to "
                             f"(batch, heads, 1, keys) = {(batch, heads, 1, key.shape[2])}") from None
    check_same_device(query=query, key=key, value=value, mask=mask)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """`softmax(q k^T * scale + mask) v` for one query token a head: query (batch, heads, 1, head_dim), keys and
    values (batch, key heads, keys, head_dim), any strides; `mask` additive (float) or True where a key is seen
    (bool), broadcastable to (batch, heads, 1, keys). Returns (batch, heads, 1, head_dim) in the query's dtype,
    computed in fp32 (default scale 1/sqrt(head_dim), as SDPA's)."""
    _check_inputs(query, key, value, mask)
    if not runs_triton("decode_attention", query):
        return decode_attention_reference(query, key, value, mask, scale)
    from .decode_attention_triton import launch

    batch, heads, _, head_dim = query.shape
    mask = None if mask is None else mask.expand(batch, heads, 1, key.shape[2])
    # Written as (batch, 1, heads, head_dim), the layout transformers wants back; returned as SDPA's view of it.
    out = query.new_empty(batch, 1, heads, head_dim)
    launch(query, key, value, mask, out, head_dim ** -0.5 if scale is None else scale)
    return out.transpose(1, 2)


def transformers_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """An attention function for transformers' `AttentionInterface`: `decode_attention` for one query token (a
    decoding step; the kernel where it runs, else its reference), transformers' SDPA function for anything else or
    for what the kernel does not do (dropout, a sink)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] == 1 and not (dropout and module.training) and kwargs.get("s_aux") is None:
        return decode_attention(query, key, value, attention_mask, scaling).transpose(1, 2), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register_with_transformers() -> str:
    """Registers `transformers_attention` as `ATTENTION_NAME`, with SDPA's masks (idempotent); returns the name,
    for `model.set_attn_implementation`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, transformers_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return ATTENTION_NAME
