"""Batching: the ops vmap batches badly or wrongly, as calls it batches into one.

- SDPA through snlp::attention where vmap's own rule falls short (`needs_batched_attention`);
- `index_copy_` (KV-cache writes) as `index_put_`, which vmap batches into one write of the new
  positions of every layer;
- under vmap, linears whose input has a symbolic size as einsums (`linear_by_einsum`), and `cat` and
  `layer_norm` with symbolic sizes in vmap-safe forms (`cat_for_vmap`, `layer_norm_for_vmap`): their
  vmap rules read the sizes as integers, which pins them (a DynamicCache's length: one compile per token).

Invariant: each replacement computes the node's value exactly (the same ops, batched); every
backend runs this family, since without it some graphs are wrong under vmap, not just slow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ...fx import ops
from ...fx.values import SYMBOLIC, traced
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


def cat_for_vmap(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    """`torch.cat(tensors, dim)` under vmap with symbolic sizes, where vmap's rule for cat reads the sizes
    as integers and so pins them: parts of one size as a stack flattened into `dim`, parts of different
    sizes as the sum of the parts zero-padded to the whole (the same values, but that a -0.0 becomes 0.0).
    Legacy empty parts (1-D, no elements: a DynamicCache's first keys), which cat skips, are skipped."""
    tensors = [t for t in tensors if not (t.dim() == 1 and statically_known_true(t.numel() == 0))] or list(tensors)
    if len(tensors) == 1:
        return tensors[0].clone()
    dim = dim % tensors[0].dim()
    sizes = [t.size(dim) for t in tensors]
    if all(statically_known_true(s == sizes[0]) for s in sizes):
        return torch.stack(list(tensors), dim).flatten(dim, dim + 1)
    total, start, out = sum(sizes), 0, None
    for t, size in zip(tensors, sizes, strict=True):
        padded = F.pad(t, (0, 0) * (t.dim() - 1 - dim) + (start, total - start - size))
        out = padded if out is None else out + padded
        start = start + size
    return out


def layer_norm_for_vmap(
    x: Tensor,
    shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *_: Any,
) -> Tensor:
    """`layer_norm` under vmap with symbolic sizes, where vmap's rule for it reads the sizes as integers
    and so pins them: the normalisation written out over the last `len(shape)` dims (the same values up to
    float rounding)."""
    dims = tuple(range(-len(shape), 0))
    var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    out = out if weight is None else out * weight
    return out if bias is None else out + bias


# ops whose vmap rules read symbolic sizes as integers, and their vmap-safe forms of the same values
FOR_VMAP = {
    torch.ops.aten.cat.default: cat_for_vmap,
    torch.cat: cat_for_vmap,
    torch.ops.aten.layer_norm.default: layer_norm_for_vmap,
    F.layer_norm: layer_norm_for_vmap,
}


def symbolic_result(node: Node) -> bool:
    """A call whose traced result has a symbolic size."""
    value = traced(node)
    return isinstance(value, Tensor) and any(isinstance(s, SYMBOLIC) for s in value.shape)


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
    if where is Where.BATCHED and node.op == "call_function" and node.target in FOR_VMAP and symbolic_result(node):
        return FOR_VMAP[node.target], {}
    if needs_batched_attention(node):
        return sdpa, {}
    if (node.op, node.target) == ("call_method", "index_copy_") or ops.calls(node, ops.INDEX_COPY_):
        return index_copy_, {}
    return None


BATCHING = Lowering("batching", retarget=_retarget)
