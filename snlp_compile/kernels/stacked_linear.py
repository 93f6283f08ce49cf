"""Decode-time linears of all parallel layers at once: `snlp::linear` and `snlp::stacked_linear`.

At decode the rewritten graph multiplies a few tokens per layer by every layer's own weight: a
batched GEMV whose cost is reading the stacked weights once (the HBM floor). Layer graphs call
`snlp::linear` (one layer: x [..., K] @ weight_i[N_i, K]^T for each of its weights; several
weights are sibling linears of one input, e.g. q, k and v, computed by one kernel launch); under
vmap it becomes one `snlp::stacked_linear` (x [L, M, K] @ weight_i[L, N_i, K]^T -> [L, M, N_i]
each). Invariants:

- both return one new contiguous tensor per weight, equal to `F.linear` / the naive
  `reference_stacked_linear` (float32 accumulation);
- both run the Triton kernel on CUDA for 16-bit inputs on one device with at most
  `GEMV_MAX_TOKENS` rows per layer and at most `MAX_SIBLINGS` weights (one program per layer and
  BLOCK_N output features streams that weight tile once; the tiles come from `gemv_tiles`);
  otherwise, and on CPU, they are `torch.bmm` / `F.linear`. The kernel itself also runs on CPU
  under TRITON_INTERPRET=1 (tests);
- weights are read where they lie, at any strides (stride 0 on the layer axis: one weight shared
  by every layer), never copied;
- inference only: no autograd formula (the rewrite routes linears here only when not training).
"""

from __future__ import annotations

from collections.abc import Sequence
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

GEMV_MAX_TOKENS = 16  # rows per layer the kernel handles (one 16-row tensor-core tile)
MAX_SIBLINGS = 4  # weights one launch reads (q, k, v; gate, up)


class GemvTiles(NamedTuple):
    """Launch configuration of the GEMV kernel."""

    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4


def gemv_tiles(layers: int, n: int, k: int) -> GemvTiles:
    """Tiles for [layers, n, k] weights, fitted to a sweep of the presets' decode shapes
    (benchmarks/bench_gemv.py --sweep): wide tiles while they still launch enough programs; narrow
    ones, long K steps and deeper pipelines when less than a wave of programs would each walk a long
    row; three stages once programs are plentiful, so that more of them share an SM."""

    def programs(block_n: int) -> int:
        return layers * -(-n // block_n)

    if programs(128) >= 200:
        block_n = 128
    elif programs(64) >= 200:
        block_n = 64
    else:
        block_n = 16 if k >= 2048 else 32
    few = programs(block_n) < 132
    return GemvTiles(block_n=block_n, block_k=256 if few and k >= 1280 else 128, num_stages=4 if few else 3)


def reference_stacked_linear(x: Tensor, weights: Sequence[Tensor]) -> list[Tensor]:
    """The naive reference: [x[l] @ weight[l]^T for each weight], accumulated in float32."""
    return [torch.einsum("lmk,lnk->lmn", x.float(), w.float()).to(x.dtype) for w in weights]


if triton is not None:

    @triton.jit
    def _select(in1, in2, in3, a0, a1, a2, a3):
        """The value of the weight slot a program serves (in_i: it serves slot i or a later one)."""
        return tl.where(in3, a3, tl.where(in2, a2, tl.where(in1, a1, a0)))

    # The data offsets (dw*, dy*) stay specialised: Triton's divisible-by-16 hint on them is what lets
    # the weight loads and output stores vectorise (unspecialised, the stacked GEMVs of an H100 decode
    # step ran 3.5x slower). Allocations are 512-byte aligned, so the hint holds; a new sign or int
    # width of an offset (allocations moving) can still compile one more variant.
    @triton.jit
    def _stacked_gemv_kernel(
        x_ptr, w_ptr, y_ptr, M, K, sxl, sxm, sxk,
        dw0, n0, s0l, s0n, s0k, dy0, t0l, t0m, dw1, n1, s1l, s1n, s1k, dy1, t1l, t1m,
        dw2, n2, s2l, s2n, s2k, dy2, t2l, t2m, dw3, n3, s3l, s3n, s3k, dy3, t3l, t3m,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """Program (layer, b): output block b over all weights' blocks in slot order. Weight i lies dw_i
        elements after w_ptr, its output dy_i after y_ptr; the program picks its slot's offsets, size
        and strides by scalar selects, so one tile loop (one set of shared-memory buffers) serves all."""
        layer = tl.program_id(0).to(tl.int64)  # layer * stride overflows int32 on large stacks
        b = tl.program_id(1)
        e0 = tl.cdiv(n0, BLOCK_N)
        e1 = e0 + tl.cdiv(n1, BLOCK_N)
        e2 = e1 + tl.cdiv(n2, BLOCK_N)
        in1, in2, in3 = b >= e0, b >= e1, b >= e2
        first = _select(in1, in2, in3, 0, e0, e1, e2)
        N = _select(in1, in2, in3, n0, n1, n2, n3)
        swn = _select(in1, in2, in3, s0n, s1n, s2n, s3n)
        swk = _select(in1, in2, in3, s0k, s1k, s2k, s3k)
        sym = _select(in1, in2, in3, t0m, t1m, t2m, t3m)
        w_ptr += _select(in1, in2, in3, dw0, dw1, dw2, dw3) + layer * _select(in1, in2, in3, s0l, s1l, s2l, s3l)
        y_ptr += _select(in1, in2, in3, dy0, dy1, dy2, dy3) + layer * _select(in1, in2, in3, t0l, t1l, t2l, t3l)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = (b - first) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + layer * sxl + offs_m[:, None] * sxm + offs_k[None, :] * sxk,
                mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
                other=0.0,
            )
            w = tl.load(
                w_ptr + offs_n[:, None] * swn + offs_k[None, :] * swk,
                mask=(offs_n[:, None] < N) & (offs_k[None, :] < K),
                other=0.0,
            )
            acc += tl.dot(x, tl.trans(w))
        y = y_ptr + offs_m[:, None] * sym + offs_n[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _offsets(tensors: Sequence[Tensor]) -> list[int]:
    """Element offsets of each tensor's data from the first's (one dtype)."""
    base, size = tensors[0].data_ptr(), tensors[0].element_size()
    return [(t.data_ptr() - base) // size for t in tensors]


def triton_stacked_linear(x: Tensor, weights: Sequence[Tensor], tiles: GemvTiles | None = None) -> list[Tensor]:
    """The Triton kernel: x [L, M, K] (M <= GEMV_MAX_TOKENS) @ weight_i[L, N_i, K]^T for 1 to
    MAX_SIBLINGS weights of x's dtype and device -> one [L, M, N_i] tensor each; `tiles` default to
    `gemv_tiles(L, sum N_i, K)`."""
    if triton is None:
        raise RuntimeError("triton_stacked_linear needs Triton (pip install triton)")
    L, M, K = x.shape
    if (
        not 1 <= len(weights) <= MAX_SIBLINGS
        or not 1 <= M <= GEMV_MAX_TOKENS
        or any(w.dim() != 3 or w.shape[0] != L or w.shape[2] != K for w in weights)
        or any(w.dtype != x.dtype or w.device != x.device for w in weights)
    ):
        raise ValueError(
            f"triton_stacked_linear: x [L, M, K] with 1 <= M <= {GEMV_MAX_TOKENS} and 1 to {MAX_SIBLINGS} weights "
            f"[L, N_i, K] of x's dtype and device, got {tuple(x.shape)} {x.dtype} and "
            f"{[(tuple(w.shape), w.dtype) for w in weights]}"
        )
    sizes = [w.shape[1] for w in weights]
    tiles = tiles or gemv_tiles(L, sum(sizes), K)
    outs = [x.new_empty((L, M, n)) for n in sizes]
    unused = MAX_SIBLINGS - len(weights)  # slots of zero features, never read or written
    padded_w, padded_y = [*weights, *[weights[0]] * unused], [*outs, *[outs[0]] * unused]
    slots = zip(padded_w, _offsets(padded_w), sizes + [0] * unused, padded_y, _offsets(padded_y), strict=True)
    args = [a for w, dw, n, y, dy in slots for a in (dw, n, *w.stride(), dy, y.stride(0), y.stride(1))]
    grid = (L, sum(-(-n // tiles.block_n) for n in sizes))
    _stacked_gemv_kernel[grid](
        x, weights[0], outs[0], M, K, *x.stride(), *args,
        BLOCK_M=GEMV_MAX_TOKENS, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return outs


def _in_layer_span(w: Tensor) -> int:
    """The largest element offset the kernel computes inside one layer's [N, K] matrix."""
    return (w.shape[-2] - 1) * abs(w.stride(-2)) + (w.shape[-1] - 1) * abs(w.stride(-1))


def _runs_gemv(x: Tensor, weights: Sequence[Tensor], rows: int) -> bool:
    """The kernel serves this call: CUDA, 16-bit weights of x's dtype on x's device (float32 stays off
    it: tl.dot would round it to TF32), 1 <= rows <= GEMV_MAX_TOKENS per layer, at most MAX_SIBLINGS
    weights, each layer's matrix spanning under 2**31 elements (the kernel's in-layer offsets are int32)."""
    half = x.dtype in HALF_DTYPES and all(w.dtype == x.dtype for w in weights)
    fits = 1 <= rows <= GEMV_MAX_TOKENS and 1 <= len(weights) <= MAX_SIBLINGS
    fits = fits and all(w.device == x.device and _in_layer_span(w) < 2**31 for w in weights)
    return x.is_cuda and triton is not None and half and fits


def _check_weights(name: str, weights: Sequence[Tensor], dim: int) -> None:
    if not weights or any(w.dim() != dim for w in weights):
        raise ValueError(f"{name}: weights must be a non-empty list of {dim}-D tensors")


@torch.library.custom_op("snlp::stacked_linear", mutates_args=())
def stacked_linear(x: Tensor, weights: list[Tensor]) -> list[Tensor]:
    """[x [L, M, K] @ weight_i[L, N_i, K]^T -> [L, M, N_i]]: the Triton GEMV where `_runs_gemv`, else bmm."""
    _check_weights("stacked_linear", weights, 3)
    if _runs_gemv(x, weights, x.shape[1]):
        return triton_stacked_linear(x, weights)
    return [torch.bmm(x, w.transpose(1, 2)) for w in weights]


@stacked_linear.register_fake
def _(x, weights):
    return [x.new_empty((x.shape[0], x.shape[1], w.shape[1])) for w in weights]


@torch.library.custom_op("snlp::linear", mutates_args=())
def linear(x: Tensor, weights: list[Tensor]) -> list[Tensor]:
    """One layer's bias-free linears of one input, [x [..., K] @ weight_i[N_i, K]^T]: the Triton GEMV
    where `_runs_gemv` (decode; a one-layer stack), else F.linear; under vmap, one `stacked_linear`."""
    _check_weights("linear", weights, 2)
    if _runs_gemv(x, weights, x.numel() // max(x.shape[-1], 1)):
        rows = x.reshape(1, -1, x.shape[-1])
        outs = triton_stacked_linear(rows, [w.unsqueeze(0) for w in weights])
        return [out.reshape(*x.shape[:-1], out.shape[-1]) for out in outs]
    return [F.linear(x, w) for w in weights]


@linear.register_fake
def _(x, weights):
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights]


def _vmap(info, in_dims, x, weights):
    n = info.batch_size
    x_dim, weight_dims = in_dims
    x = x.movedim(x_dim, 0) if x_dim is not None else x.expand(n, *x.shape)
    if all(d is None for d in weight_dims):  # weights shared by every layer: plain linears, no per-layer copies
        return linear(x, weights), [0] * len(weights)
    weights = [
        w.movedim(d, 0) if d is not None else w.expand(n, *w.shape) for w, d in zip(weights, weight_dims, strict=True)
    ]
    outs = stacked_linear(x.reshape(n, -1, x.shape[-1]), weights)
    return [out.reshape(*x.shape[:-1], out.shape[-1]) for out in outs], [0] * len(outs)


linear.register_vmap(_vmap)


def bias_free_linear(input: Tensor, weight: Tensor, bias: None = None) -> Tensor:
    """Drop-in for a bias-free F.linear call in a rewritten graph (same argument names), through snlp::linear."""
    if bias is not None:
        raise ValueError("bias_free_linear: bias must be None")
    return linear(input, [weight])[0]
