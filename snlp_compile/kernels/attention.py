"""Attention that vmap folds into one batched call: `snlp::attention`.

`torch.vmap` over `F.scaled_dot_product_attention` has no batching rule for some backends (the
CPU flash kernel runs layer by layer) and hands the CUDA efficient kernel a mask it rejects (at
batch above 1, and for a float32 query, which that kernel serves at any batch). The rewrite
evaluates all layers of a layer group under vmap, so its layer graphs call this op instead.
Invariants:

- forward and backward equal `F.scaled_dot_product_attention` and its autograd gradient;
- under vmap the layer axis is folded into the batch axis: one attention call for all layers;
- to inductor the op is opaque and calls the fused SDPA kernels at run time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .decode_attention import decode_attention


def _probabilities(q: Tensor, k: Tensor, mask: Tensor | None, is_causal: bool, scale: float | None) -> Tensor:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale
    T, S = scores.shape[-2:]
    if is_causal:
        scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(-1)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, scale: float | None):
    """The naive reference: softmax(q k^T * scale + mask) v, in float32."""
    return (_probabilities(q, k, mask, is_causal, scale) @ v.float()).to(q.dtype)


@torch.library.custom_op("snlp::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, scale: float | None) -> Tensor:
    # contiguous: the fake kernel promises a contiguous result, whatever layout the backend picks
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale).contiguous()


@attention.register_fake
def _(q, k, v, mask, is_causal, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("snlp::attention_backward", mutates_args=())
def attention_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, scale: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of softmax(q k^T * scale + mask) v, recomputing the probabilities (float32)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    probs = _probabilities(q, k, mask, is_causal, scale)
    qf, kf, vf, gf = q.float(), k.float(), v.float(), grad.float()
    d_probs = gf @ vf.transpose(-2, -1)
    d_scores = probs * (d_probs - (d_probs * probs).sum(-1, keepdim=True)) * scale
    dq, dk, dv = d_scores @ kf, d_scores.transpose(-2, -1) @ qf, probs.transpose(-2, -1) @ gf
    grads = (dq, dk.sum_to_size(k.shape), dv.sum_to_size(v.shape))
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (q, k, v), strict=True))


@attention_backward.register_fake
def _(grad, q, k, v, mask, is_causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, is_causal, scale = inputs
    ctx.save_for_backward(q, k, v, mask)
    ctx.is_causal, ctx.scale = is_causal, scale


def _backward(ctx, grad):
    q, k, v, mask = ctx.saved_tensors
    dq, dk, dv = attention_backward(grad.contiguous(), q, k, v, mask, ctx.is_causal, ctx.scale)
    return dq, dk, dv, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)


def _fold(t: Tensor, dim: int | None, n: int) -> Tensor:
    """[.., n at dim, ..] (or unbatched, broadcast to n) -> [n * s0, s1, ...]: the vmap axis folded
    into the first per-sample axis (the attention batch)."""
    t = t.movedim(dim, 0) if dim is not None else t.expand(n, *t.shape)
    return t.reshape(n * t.shape[1], *t.shape[2:])


def _fold_mask(mask: Tensor | None, dim: int | None, n: int, rank: int, lead: int) -> Tensor | None:
    """The mask folded like q (per-sample rank `rank`, first axis `lead`); an unbatched mask that
    broadcasts over the batch is passed through untouched (no copy)."""
    if mask is None or (dim is None and (mask.dim() < rank or mask.shape[0] == 1)):
        return mask
    m = mask.movedim(dim, 0) if dim is not None else mask.expand(n, *mask.shape)
    m = m.reshape(n, *([1] * (rank - (m.dim() - 1))), *m.shape[1:])
    return m.expand(n, lead, *m.shape[2:]).reshape(n * lead, *m.shape[2:])


def _vmap(info, in_dims, q, k, v, mask, is_causal, scale):
    n = info.batch_size
    rank = q.dim() - (in_dims[0] is not None)
    lead = q.shape[1] if in_dims[0] == 0 else q.movedim(in_dims[0], 0).shape[1]
    folded = [_fold(t, d, n) for t, d in zip((q, k, v), in_dims[:3], strict=True)]
    out = attention(*folded, _fold_mask(mask, in_dims[3], n, rank, lead), is_causal, scale)
    return out.reshape(n, lead, *out.shape[1:]), 0


attention.register_vmap(_vmap)


def _vmap_backward(info, in_dims, grad, q, k, v, mask, is_causal, scale):
    n = info.batch_size
    rank = q.dim() - (in_dims[1] is not None)
    lead = q.movedim(in_dims[1], 0).shape[1] if in_dims[1] is not None else q.shape[0]
    folded = [_fold(t, d, n) for t, d in zip((grad, q, k, v), in_dims[:4], strict=True)]
    grads = attention_backward(*folded, _fold_mask(mask, in_dims[4], n, rank, lead), is_causal, scale)
    return tuple(g.reshape(n, lead, *g.shape[1:]) for g in grads), (0, 0, 0)


attention_backward.register_vmap(_vmap_backward)


def sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    decode: bool = False,
) -> Tensor:
    """Drop-in for F.scaled_dot_product_attention (no dropout, no GQA flag) through snlp::attention;
    with `decode` (one layer's decode step, inference, no causal flag) through snlp::decode_attention."""
    if dropout_p or enable_gqa or (decode and is_causal):
        raise ValueError("snlp attention supports dropout_p=0 and enable_gqa=False only, and no is_causal with decode")
    if decode:
        return decode_attention(query, key, value, attn_mask, scale)
    return attention(query, key, value, attn_mask, is_causal, scale)
