"""The Triton kernel of `decode_attention.py` (reference, checks and transformers' hook there), imported only when it
runs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import on_device

MAX_BLOCK_KEYS = 64  # keys scored at once; a decoding cache of up to 64 slots (BLIP-2's 49) is one block


@triton.jit
def _decode_attention_kernel(Q, K, V, M, O, heads, group, keys, head_dim, scale,
                             q_sb, q_sh, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, m_sb, m_sh, m_sn, o_sb, o_sh,
                             HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr,
                             BLOCK_KEYS: tl.constexpr, BLOCK_DIM: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // heads
    h = row % heads
    kv_h = h // group  # keys and values shared by `group` query heads
    dims = tl.arange(0, BLOCK_DIM)
    dim_mask = dims < head_dim
    q = tl.load(Q + b * q_sb + h * q_sh + dims, mask=dim_mask, other=0.0).to(tl.float32) * scale
    best = tl.full((), float("-inf"), tl.float32)
    total = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_DIM,), tl.float32)
    for start in range(0, keys, BLOCK_KEYS):
        n = start + tl.arange(0, BLOCK_KEYS)
        key_mask = n < keys
        tile = key_mask[:, None] & dim_mask[None, :]
        k = tl.load(K + b * k_sb + kv_h * k_sh + n[:, None] * k_sn + dims[None, :], mask=tile, other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        if HAS_MASK:
            m = tl.load(M + b * m_sb + h * m_sh + n * m_sn, mask=key_mask, other=0)
            if BOOL_MASK:
                scores = tl.where(m != 0, scores, float("-inf"))
            else:
                scores += m.to(tl.float32)
        scores = tl.where(key_mask, scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=0))
        # While every key so far is masked out the running maximum is -inf: shift by 0 so that exp gives 0, not NaN.
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)
        weights = tl.exp(scores - shift)
        rescale = tl.exp(best - shift)
        v = tl.load(V + b * v_sb + kv_h * v_sh + n[:, None] * v_sn + dims[None, :], mask=tile, other=0.0)
        acc = acc * rescale + tl.sum(weights[:, None] * v.to(tl.float32), axis=0)
        total = total * rescale + tl.sum(weights, axis=0)
        best = new_best
    tl.store(O + b * o_sb + h * o_sh + dims, (acc / total).to(O.dtype.element_ty), mask=dim_mask)


def launch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, out: torch.Tensor,
           scale: float) -> None:
    """Runs the kernel on inputs `decode_attention` has checked; `mask` expanded to (batch, heads, 1, keys) and `out`
    (batch, 1, heads, head_dim). Strides are passed as they are, so a cache's views are read in place; the head
    dimension is read with a stride of one."""
    batch, heads, _, head_dim = query.shape
    keys = key.shape[2]
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    mask_strides = (0, 0, 0) if mask is None else (mask.stride(0), mask.stride(1), mask.stride(3))
    with on_device(query):
        _decode_attention_kernel[(batch * heads,)](
            query, key, value, query if mask is None else mask, out, heads, heads // key.shape[1], keys, head_dim,
            scale, query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2), value.stride(0),
            value.stride(1), value.stride(2), *mask_strides, out.stride(0), out.stride(2),
            HAS_MASK=mask is not None, BOOL_MASK=mask is not None and mask.dtype == torch.bool,
            BLOCK_KEYS=min(MAX_BLOCK_KEYS, triton.next_power_of_2(keys)), BLOCK_DIM=triton.next_power_of_2(head_dim),
        )
