"""Batching: the ops vmap batches badly or wrongly, as calls it batches into one.

- SDPA through snlp::attention where vmap's own rule falls short (`needs_batched_attention`);
- `index_copy_` (KV-cache writes) as `index_put_`, which vmap batches into one write of the new
  positions of every layer;
- under vmap, linears whose input has a symbolic size as einsums (`linear_by_einsum`).

Invariant: each replacement computes the node's value exactly (the same ops, batched); every
backend runs this family, since without it some graphs are wrong under vmap, not just slow.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import Node

from ...fx import ops
from ...fx.values import traced
from ...kernels import HALF_DTYPES
from ...kernels.attention import sdpa
from ..rewrite.lowering_list import Lowering, Where

SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa_arguments(node: Node) -> dict[str, Any] | None:
    """The arguments (by name) of an F.scaled_dot_product_attention call without dropout or GQA flag;
    None for any other node."""
    if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
        return None
    bound = {**dict(zip(SDPA_ARGS, node.args, strict=False)), **node.kwargs}
    return None if bound.get("dropout_p") or bound.get("enable_gqa") else bound


def needs_batched_attention(node: Node) -> bool:
    """Route an SDPA call through snlp::attention where vmap's own batching falls short: on CPU
    (no batching rule: a loop over layers) and on CUDA with a mask where SDPA picks its efficient
    kernel, which rejects the vmapped mask: batch > 1, or a float32 query at any batch. Elsewhere
    (16-bit, batch 1) vmap's rule is kept: it lets inductor see SDPA."""
    args = sdpa_arguments(node)
    if args is None:
        return False
    query = traced(args.get("query"))
    if not isinstance(query, Tensor) or query.device.type != "cuda":
        return True
    half = query.dtype in HALF_DTYPES
    return args.get("attn_mask") is not None and query.dim() > 3 and (query.shape[0] != 1 or not half)


def index_copy_(target: Tensor, dim: int, index: Tensor, source: Tensor) -> Tensor:
    """`target.index_copy_(dim, index, source)` as `aten.index_put_`, which vmap batches into one write of
    the new positions of every layer (vmap has no rule for index_copy_: it loops over the layers, and
    functionalisation turns that loop into whole-cache copies).

    An index shared by the layers writes through `index_put_` on `target` itself (inductor turns it
    into an in-place scatter of the new positions); a per-layer (vmap-batched) index needs the dim-0
    form, which vmap's rule handles correctly (its rule for a leading None index writes wrong slots).
    """
    dim = dim % target.dim()
    if dim == 0 or not torch._C._functorch.is_batchedtensor(index):
        torch.ops.aten.index_put_(target, [None] * dim + [index], source)
    else:
        target.movedim(dim, 0).index_put_((index,), source.movedim(dim, 0))  # a view: writes reach target
    return target


def linear_by_einsum(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear as an einsum. Under vmap, torch 2.11's matmul batching rule calls numel() on a tensor
    with symbolic sizes, which fails while inductor traces a graph of symbolic sequence length;
    einsum's batching does not."""
    out = torch.einsum("...i,oi->...o", input, weight)
    return out if bias is None else out + bias


def _symbolic_linear(node: Node) -> bool:
    """A linear whose input has a symbolic size (dynamic=True, or dynamo's automatic dynamic shapes)."""
    if node.op != "call_function" or node.target not in ops.LINEAR or not node.args:
        return False
    value = traced(node.args[0])
    return isinstance(value, Tensor) and any(isinstance(s, torch.SymInt) for s in value.shape)


def _retarget(node: Node, where: Where) -> tuple[Any, dict[str, Any]] | None:
    if where is Where.OUTSIDE:
        return None
    if where is Where.BATCHED and _symbolic_linear(node):
        return linear_by_einsum, {}
    if needs_batched_attention(node):
        return sdpa, {}
    if (node.op, node.target) == ("call_method", "index_copy_") or ops.calls(node, ops.INDEX_COPY_):
        return index_copy_, {}
    return None


BATCHING = Lowering("batching", retarget=_retarget)
