"""RMS normalisation that vmap folds into one fused call: `snlp::rms_norm`.

vmap has no batching rule for the fused RMS-norm kernel, so under vmap `torch.rms_norm` runs its
decomposition instead: a float32 copy, pow, mean, rsqrt, a multiply and a cast back, each a kernel
over the whole batched tensor. Run eagerly, that dominated the parallel layers' norms (H100,
paper-0.5b, 2048 tokens, 24 layers under vmap: about 1.3 of the forward's 5.9 ms of GPU time).
The rewrite gives this op to the layer graphs that the eager inner compiler runs under vmap;
inductor fuses a norm by itself, so its graphs keep `torch.rms_norm`. Invariants:

- the op equals `torch.rms_norm` (same arguments, same kernel);
- under vmap the vmapped axis becomes a leading axis of one call (a per-layer weight scales the
  normalised tensor afterwards, in the input's dtype);
- inference only: it has no autograd formula (the rewrite never uses it for training graphs).
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("snlp::rms_norm", mutates_args=())
def rms_norm(
    input: Tensor, normalized_shape: list[int], weight: Tensor | None = None, eps: float | None = None
) -> Tensor:  # noqa: A002 (torch.rms_norm's own argument names)
    return torch.rms_norm(input, normalized_shape, weight, eps)


@rms_norm.register_fake
def _(input, normalized_shape, weight=None, eps=None):  # noqa: A002
    return torch.empty_like(input)


def _vmap(info, in_dims, input, normalized_shape, weight=None, eps=None):  # noqa: A002
    x_dim, w_dim = in_dims[0], in_dims[2] if len(in_dims) > 2 else None
    x = input.movedim(x_dim, 0) if x_dim is not None else input.expand(info.batch_size, *input.shape)
    if w_dim is None:
        return rms_norm(x, normalized_shape, weight, eps), 0
    w = weight.movedim(w_dim, 0)
    scale = w.reshape(w.shape[0], *[1] * (x.dim() - w.dim()), *w.shape[1:])
    return rms_norm(x, normalized_shape, None, eps) * scale, 0


rms_norm.register_vmap(_vmap)
