"""Decode kernels: the GEMV and split-KV attention kernels that serve decode steps (inference only:
they have no autograd formula).

- bias-free linears through snlp::linear, in every graph (the LM head too), and the sibling linears
  of one input in one call (`sibling_linears`);
- in a graph for one-layer calls, decode attention through snlp::decode_attention's split-KV
  kernels (a stacked call's SDPA already fills the GPU).

Invariant: every replacement computes its node's value; the kernels pick their path per shape
at run time (prefill shapes take the ordinary ops).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.fx import Graph, Node

from ...fx import ops
from ...fx.values import example_value, traced
from ...kernels.attention import sdpa
from ...kernels.decode_attention import runs_decode_attention
from ...kernels.stacked_linear import bias_free_linear
from ..rewrite.lowering_list import Lowering, Where
from .batching import SDPA_ARGS, sdpa_arguments
from .sibling_linears import fuse_sibling_linears


def decode_attention_call(node: Node) -> bool:
    """An SDPA call that snlp::decode_attention's split-KV kernels serve (`runs_decode_attention`)."""
    args = sdpa_arguments(node)
    if args is None:
        return False
    q, k, v, mask = (traced(args.get(name)) for name in SDPA_ARGS[:4])
    if not all(isinstance(t, Tensor) for t in (q, k, v)) or not (mask is None or isinstance(mask, Tensor)):
        return False
    return runs_decode_attention(q, k, v, mask, bool(args.get("is_causal", False)))


def is_bias_free_linear(node: Node) -> bool:
    """A linear with no bias and a 2-D weight (what snlp::linear computes)."""
    if node.op != "call_function" or node.target not in ops.LINEAR or len(node.args) < 2:
        return False
    bias = node.kwargs.get("bias", node.args[2] if len(node.args) > 2 else None)
    weight = example_value(node.args[1]) if isinstance(node.args[1], Node) else None
    return bias is None and isinstance(weight, Tensor) and weight.dim() == 2


def _retarget(node: Node, where: Where) -> tuple[Any, dict[str, Any]] | None:
    if is_bias_free_linear(node):
        return bias_free_linear, {}
    if where is Where.ONE_LAYER and decode_attention_call(node):
        return sdpa, {"decode": True}
    return None


def _siblings(graph: Graph, where: Where) -> None:
    if where is not Where.OUTSIDE:
        fuse_sibling_linears(graph)


DECODE_KERNELS = Lowering("decode kernels", retarget=_retarget, graph_pass=_siblings, one_layer_differs=True)
