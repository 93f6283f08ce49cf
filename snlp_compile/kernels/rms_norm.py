"""RMS normalisation that vmap folds into one fused call: `snlp::rms_norm`.

vmap has no batching rule for the fused RMS-norm kernel, so under vmap `torch.rms_norm` runs its
decomposition instead: a float32 copy, pow, mean, rsqrt, a multiply and a cast back, each a kernel
over the whole batched tensor (benchmarks/RESULTS.md: most of the eager path's extra GPU time).
The rewrite gives this op to the layer graphs that the eager inner compiler runs under vmap;
inductor fuses a norm by itself, so its graphs keep `torch.rms_norm`. Invariants:

- the op is `torch.rms_norm` (same arguments, kernel and output dtype: the input's);
- under vmap it is one call over the vmapped axis as a leading axis; a per-layer (batched)
  weight then scales the normalised tensor, which rounds once more in 16-bit dtypes than the
  fused kernel does (a shared weight or none: the same values as a per-layer loop);
- inference only: it has no autograd formula (the rewrite never uses it for training graphs).
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("snlp::rms_norm", mutates_args=())
def rms_norm(
    input: Tensor, normalized_shape: list[int], weight: Tensor | None = None, eps: float | None = None
) -> Tensor:
    return torch.rms_norm(input, normalized_shape, weight, eps)


@rms_norm.register_fake
def _(input, normalized_shape, weight=None, eps=None):
    return torch.empty_like(input)


def _vmap(info, in_dims, input, normalized_shape, weight=None, eps=None):
    x_dim, w_dim = in_dims[0], in_dims[2] if len(in_dims) > 2 else None  # one entry per argument passed
    x = input if x_dim is None else input.movedim(x_dim, 0)
    if w_dim is None:  # then the input is batched (vmap calls this rule only when something is)
        return rms_norm(x, normalized_shape, weight, eps), 0
    w = weight.movedim(w_dim, 0)
    scale = w.reshape(w.shape[0], *[1] * (x.dim() - (x_dim is not None) - (w.dim() - 1)), *w.shape[1:])
    return (rms_norm(x, normalized_shape, None, eps) * scale).to(input.dtype), 0


rms_norm.register_vmap(_vmap)
