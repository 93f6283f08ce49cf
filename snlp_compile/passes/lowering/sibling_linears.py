"""Sibling linears: bias-free linears of one input (q, k and v; gate and up) as one `snlp::linear`.

At decode each linear of a layer is a GEMV whose time is mostly launch and memory latency, so
reading the siblings' weights in one launch saves launches in every sequential layer (and in
the stacked block). Invariants:

- only `bias_free_linear` calls of a layer graph are fused, in groups of at most MAX_SIBLINGS that
  read the same input node, whose weights are graph inputs (placeholders or attributes: defined
  before any linear), and whose output has at most GEMV_MAX_TOKENS rows (decode shapes);
- each fused linear's value is its own output of the one call (a new contiguous tensor, as
  F.linear's), so every user sees what it saw before.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node

from ...fx.values import example_value
from ...kernels.stacked_linear import GEMV_MAX_TOKENS, MAX_SIBLINGS, bias_free_linear


def _decode_linear(node: Node) -> bool:
    if node.op != "call_function" or node.target is not bias_free_linear or len(node.args) < 2:
        return False
    if any(value is not None for value in (*node.args[2:], *node.kwargs.values())):  # bias=None only
        return False
    out = example_value(node)
    return isinstance(out, torch.Tensor) and out.dim() >= 1 and out.numel() <= GEMV_MAX_TOKENS * out.shape[-1]


def fuse_sibling_linears(graph: Graph) -> int:
    """Fuse the sibling linears of `graph` in place; returns the number of calls that replaced them."""
    siblings: dict[Node, list[Node]] = {}
    for node in graph.nodes:
        if _decode_linear(node) and isinstance(node.args[0], Node):
            siblings.setdefault(node.args[0], []).append(node)
    fused = 0
    for nodes in siblings.values():
        for start in range(0, len(nodes), MAX_SIBLINGS):
            group = nodes[start : start + MAX_SIBLINGS]
            weights = [n.args[1] for n in group]
            if len(group) < 2 or not all(isinstance(w, Node) and w.op in ("placeholder", "get_attr") for w in weights):
                continue
            with graph.inserting_before(group[0]):
                # the input as it is now: an earlier fusion may have replaced it by one of its outputs
                call = graph.call_function(torch.ops.snlp.linear.default, (group[0].args[0], weights))
                for i, node in enumerate(group):
                    out = graph.call_function(operator.getitem, (call, i))
                    out.meta = dict(node.meta)
                    node.replace_all_uses_with(out)
            for node in group:
                graph.erase_node(node)
            fused += 1
    return fused
