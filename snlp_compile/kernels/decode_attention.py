"""Split-KV ("flash decoding") attention for a few query tokens: `snlp::decode_attention`.

At decode each layer attends 1 to 16 new tokens over a whole static KV cache. A prefill kernel
(cuDNN's flash attention) spends one program per head on that and needs a second reduction
kernel; here the keys are split over many programs, each of which writes a partial result and
its log-sum-exp, and a second kernel combines the splits. Invariants:

- `triton_decode_attention` equals softmax(q k^T * scale + mask) v (the naive
  `attention.reference_attention`) for q [..., T, D], k and v [..., S, D] with 1 <= T <= 16, a
  boolean mask broadcastable to [..., T, S] (True = attend) or none, accumulated in float32;
  a query row with no key to attend gives zeros;
- `snlp::decode_attention` (what the decode-kernel lowering calls in graphs that run one
  layer at a time) takes the kernels for CUDA 16-bit inputs with few batch x heads rows
  (`runs_decode_attention`), else SDPA; it is inference only (no autograd formula, no vmap rule);
- the kernels also run on CPU under TRITON_INTERPRET=1 (tests); inputs are read at their strides
  where the batch axes merge (a per-batch mask broadcast over heads is copied).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import HALF_DTYPES

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path needs no Triton
    triton = None

DECODE_MAX_QUERIES = 16  # query rows one program holds (one 16-row tensor-core tile)
SPLIT_KV_MAX_ROWS = 64  # batch x heads rows up to which splitting keys beats SDPA (bench_decode_attention.py)
_BLOCK_S = 64  # keys per inner step
_TARGET_PROGRAMS = 264  # two programs per SM of an H100


class DecodeTiles(NamedTuple):
    """Launch configuration of the partial kernel: keys per split (a multiple of 64), warps, stages."""

    keys_per_split: int = 64
    num_warps: int = 8
    num_stages: int = 3


def decode_tiles(rows: int, keys: int) -> DecodeTiles:
    """Splits for `rows` (batch x heads) attending `keys` keys: at least 64 keys per split and at most
    about 264 / rows splits (two programs per SM of an H100), so that each program's serial loop
    stays short without splitting finer than one key block."""
    steps = -(-keys // (_BLOCK_S * max(1, _TARGET_PROGRAMS // max(rows, 1))))
    return DecodeTiles(keys_per_split=_BLOCK_S * max(1, steps))


def _broadcasts(mask: Tensor, q: Tensor, k: Tensor) -> bool:
    try:
        return torch.broadcast_shapes(mask.shape, (*q.shape[:-1], k.shape[-2])) == (*q.shape[:-1], k.shape[-2])
    except RuntimeError:
        return False


def runs_decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool) -> bool:
    """The kernels serve this call: CUDA, one 16-bit dtype, 1 <= T <= DECODE_MAX_QUERIES, a boolean
    mask or none, not is_causal, equal batch shapes and head dims (no broadcasting of k, v), and at
    most SPLIT_KV_MAX_ROWS batch x heads rows: with more (e.g. a whole stack of layers), SDPA's one
    program per row already fills the GPU and streams the cache faster."""
    half = q.dtype in HALF_DTYPES and k.dtype == v.dtype == q.dtype
    shapes = q.dim() >= 2 and k.shape == v.shape and k.shape[:-2] == q.shape[:-2] and k.shape[-1] == q.shape[-1]
    shapes = shapes and math.prod(q.shape[:-2]) <= SPLIT_KV_MAX_ROWS and k.device == v.device == q.device
    masked = mask is None or (mask.dtype == torch.bool and mask.device == q.device and _broadcasts(mask, q, k))
    fits = shapes and 1 <= q.shape[-2] <= DECODE_MAX_QUERIES and k.shape[-2] >= 1
    return q.is_cuda and triton is not None and half and masked and fits and not is_causal


if triton is not None:

    @triton.jit
    def _partial_kernel(
        q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, lse_ptr, T, S, D, keys_per_split, scale,
        sqz, sqt, sqd, skz, sks, skd, svz, svs, svd, smz, smt, sms, soz, sop, sot, slz, slp,
        HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Program (z, p): queries of batch row z over keys [p * keys_per_split, ...): the normalised
        partial output o[z, p] and its log-sum-exp lse[z, p] (-inf where no key is attended)."""
        z = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1)
        offs_t = tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(
            q_ptr + z * sqz + offs_t[:, None] * sqt + offs_d[None, :] * sqd,
            mask=(offs_t[:, None] < T) & (offs_d[None, :] < D),
            other=0.0,
        )
        m_i = tl.full((BLOCK_T,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_T,), tl.float32)
        acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
        start = p * keys_per_split
        end = tl.minimum(start + keys_per_split, S)
        for s0 in range(start, end, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            in_range = offs_s < end
            kv_mask = in_range[:, None] & (offs_d[None, :] < D)
            k = tl.load(k_ptr + z * skz + offs_s[:, None] * sks + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale
            valid = (offs_t[:, None] < T) & in_range[None, :]
            if HAS_MASK:
                attend = tl.load(m_ptr + z * smz + offs_t[:, None] * smt + offs_s[None, :] * sms, mask=valid, other=0)
                valid = valid & (attend != 0)
            scores = tl.where(valid, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing attended yet
            alpha = tl.exp(m_i - m_safe)
            probs = tl.exp(scores - m_safe[:, None])
            v = tl.load(v_ptr + z * svz + offs_s[:, None] * svs + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v)
            l_i = l_i * alpha + tl.sum(probs, 1)
            m_i = m_new
        attended = l_i > 0
        out = acc / tl.where(attended, l_i, 1.0)[:, None]
        lse = tl.where(attended, m_i + tl.log(tl.where(attended, l_i, 1.0)), float("-inf"))
        o = o_ptr + z * soz + p * sop + offs_t[:, None] * sot + offs_d[None, :]
        tl.store(o, out, mask=(offs_t[:, None] < T) & (offs_d[None, :] < D))
        tl.store(lse_ptr + z * slz + p * slp + offs_t, lse, mask=offs_t < T)

    @triton.jit
    def _combine_kernel(
        o_ptr, lse_ptr, y_ptr, T, D, splits, soz, sop, sot, slz, slp, syz, syt, syd,
        BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Program (z, t): y[z, t] = the splits' outputs weighted by exp(lse - logsumexp(lse))."""
        z = tl.program_id(0).to(tl.int64)
        t = tl.program_id(1)
        offs_p = tl.arange(0, BLOCK_P)
        offs_d = tl.arange(0, BLOCK_D)
        lse = tl.load(lse_ptr + z * slz + offs_p * slp + t, mask=offs_p < splits, other=float("-inf"))
        top = tl.max(lse, 0)
        weights = tl.exp(lse - tl.where(top == float("-inf"), 0.0, top))
        parts = tl.load(
            o_ptr + z * soz + offs_p[:, None] * sop + t * sot + offs_d[None, :],
            mask=(offs_p[:, None] < splits) & (offs_d[None, :] < D),
            other=0.0,
        )
        total = tl.sum(weights, 0)
        y = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(y_ptr + z * syz + t * syt + offs_d * syd, y.to(y_ptr.dtype.element_ty), mask=offs_d < D)


def _merged(t: Tensor, batch: tuple[int, ...]) -> Tensor:
    """t [*batch, a, b] as [prod(batch), a, b]: a view where the batch axes merge, else a copy."""
    return t.reshape(math.prod(batch), *t.shape[-2:])


def triton_decode_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None, tiles: DecodeTiles | None = None
) -> Tensor:
    """softmax(q k^T * scale + mask) v by the split-KV kernels; see the module invariants. `tiles`
    default to `decode_tiles(batch rows, S)`."""
    if triton is None:
        raise RuntimeError("triton_decode_attention needs Triton (pip install triton)")
    batch, (T, D), S = q.shape[:-2], q.shape[-2:], k.shape[-2]
    if not (1 <= T <= DECODE_MAX_QUERIES and k.shape == v.shape == (*batch, S, D) and S >= 1):
        raise ValueError(
            f"triton_decode_attention: q [..., T, D] with 1 <= T <= {DECODE_MAX_QUERIES} and k, v [..., S, D] of "
            f"the same batch shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"triton_decode_attention: the mask must be boolean (True = attend), got {mask.dtype}")
    scale = D**-0.5 if scale is None else scale
    Z = math.prod(batch)
    qz, kz, vz = _merged(q, batch), _merged(k, batch), _merged(v, batch)
    mz = _merged(mask.expand(*batch, T, S), batch).view(torch.uint8) if mask is not None else qz
    tiles = tiles or decode_tiles(Z, S)
    if tiles.keys_per_split < _BLOCK_S or tiles.keys_per_split % _BLOCK_S:
        raise ValueError(f"triton_decode_attention: keys_per_split must be a multiple of {_BLOCK_S}, got {tiles}")
    per_split = tiles.keys_per_split
    splits = -(-S // per_split)
    partial = torch.empty((Z, splits, T, D), device=q.device, dtype=torch.float32)
    lse = torch.empty((Z, splits, T), device=q.device, dtype=torch.float32)
    block_t, block_d = DECODE_MAX_QUERIES, max(16, triton.next_power_of_2(D))
    m_strides = mz.stride() if mask is not None else (0, 0, 0)
    _partial_kernel[(Z, splits)](
        qz, kz, vz, mz, partial, lse, T, S, D, per_split, scale,
        *qz.stride(), *kz.stride(), *vz.stride(), *m_strides, *partial.stride()[:3], *lse.stride()[:2],
        HAS_MASK=mask is not None, BLOCK_T=block_t, BLOCK_S=_BLOCK_S, BLOCK_D=block_d,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    y = q.new_empty((Z, T, D))
    _combine_kernel[(Z, T)](
        partial, lse, y, T, D, splits, *partial.stride()[:3], *lse.stride()[:2], *y.stride(),
        BLOCK_P=max(2, triton.next_power_of_2(splits)), BLOCK_T=block_t, BLOCK_D=block_d,
    )  # fmt: skip
    return y.reshape(*batch, T, D)


@torch.library.custom_op("snlp::decode_attention", mutates_args=())
def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
    """softmax(q k^T * scale + mask) v at one layer's decode step: the split-KV kernels where
    `runs_decode_attention`, else SDPA (contiguous, as the fake kernel promises)."""
    if runs_decode_attention(q, k, v, mask, False):
        return triton_decode_attention(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).contiguous()


@decode_attention.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))
