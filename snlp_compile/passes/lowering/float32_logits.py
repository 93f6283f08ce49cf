"""Float32 logits: a bias-free 16-bit linear whose only use is a float32 cast becomes one
`snlp::float32_linear` call (a GEMM that writes float32 on CUDA), so the 16-bit logits are never
written and read back by a separate cast kernel.

Invariants: only a `F.linear` with no bias, a 2-D weight and input, weight and output of one
16-bit dtype, whose single user is `.float()` or `.to(torch.float32)`, is replaced; the cast's
users then read the new call, whose meta is the cast's. Inference only (the op has no autograd
formula). Off CUDA the op is the linear and the cast, so only the graph changes. With `gemv` the
rewrite has already routed the LM head through `snlp::linear`, which this pass leaves alone.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

from ...fx.values import example_value
from ...kernels import HALF_DTYPES
from ...kernels import float32_linear as _float32_linear  # noqa: F401  (registers snlp::float32_linear)
from ..rewrite.lowering_list import Lowering, Where
from .decode_kernels import is_bias_free_linear


def _half_linear(node: Node) -> bool:
    """A bias-free linear whose input, weight and output are one 16-bit dtype (not, say, a float32
    linear that autocast runs in bf16: the op would compute it in float32)."""
    if not is_bias_free_linear(node):
        return False
    values = [example_value(n) if isinstance(n, Node) else None for n in (node, *node.args[:2])]
    if not all(isinstance(v, torch.Tensor) for v in values):
        return False
    dtypes = {v.dtype for v in values}
    return len(dtypes) == 1 and dtypes <= set(HALF_DTYPES)


def _float32_cast(node: Node) -> bool:
    """`.float()` or `.to(torch.float32)` (as a method call, nothing else passed)."""
    if node.op != "call_method" or node.kwargs and set(node.kwargs) != {"dtype"}:
        return False
    if node.target == "float":
        return len(node.args) == 1 and not node.kwargs
    if node.target == "to":
        dtypes = [*node.args[1:], *node.kwargs.values()]
        return dtypes == [torch.float32]
    return False


def fuse_float32_logits(graph: Graph) -> int:
    """Replace each linear + float32 cast of `graph` in place; returns how many were replaced."""
    fused = 0
    for cast in list(graph.nodes):
        if not _float32_cast(cast) or not isinstance(cast.args[0], Node):
            continue
        linear = cast.args[0]
        if not _half_linear(linear) or len(linear.users) != 1:
            continue
        with graph.inserting_before(cast):
            call = graph.call_function(torch.ops.snlp.float32_linear.default, (linear.args[0], linear.args[1]))
        call.meta = dict(cast.meta)
        cast.replace_all_uses_with(call)
        graph.erase_node(cast)
        graph.erase_node(linear)
        fused += 1
    return fused


def _outside(graph: Graph, where: Where) -> None:
    if where is Where.OUTSIDE:
        fuse_float32_logits(graph)


FLOAT32_LOGITS = Lowering("float32 logits", graph_pass=_outside)
