"""snlp::scratch: a per-layer copy of a tensor a layer allocates and then writes in place.

Invariant: outside vmap it is `buffer.clone()`; under vmap over the layers each layer gets its own
contiguous copy (batched on dim 0), so in-place writes of per-layer values batch; its gradient
passes straight through to `buffer`.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("snlp::scratch", mutates_args=())
def scratch(buffer: Tensor, state: Tensor) -> Tensor:
    """A copy of `buffer` that a layer writes in place. Under vmap over the layers (a batched `state`)
    each layer gets its own (contiguous) copy, so that writes of per-layer values batch: vmap cannot
    write a batched value into a tensor allocated unbatched (`torch.zeros(shape)` in the layer)."""
    return buffer.clone()


@scratch.register_fake
def _(buffer, state):
    return torch.empty_like(buffer)


def _scratch_vmap(info, in_dims, buffer, state):
    dim = in_dims[0]
    copies = buffer.movedim(dim, 0) if dim is not None else buffer.expand(info.batch_size, *buffer.shape)
    return copies.clone(), 0


scratch.register_vmap(_scratch_vmap)
scratch.register_autograd(lambda ctx, grad: (grad, None))
