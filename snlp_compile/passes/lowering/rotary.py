"""Rotary embeddings of the rotate-half form as one `snlp::rotary` call.

`fuse_rotary` finds `cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], -1)` over the two halves x1,
x2 of x's last dim (products and sums in either operand order, the second half also as
`x2 * cos - x1 * sin` or with the negation on the product) and replaces it with
`snlp::rotary(x, cos, sin)`, whose value is bitwise the same. Only graphs that run eagerly take
it (inductor fuses these ops by itself): one launch replaces eight passes over strided halves
and dispatches faster than the nine ops. Invariants:

- the new node reads x, cos and sin where the first op of the pattern read them, and nothing
  between that op and the `cat` writes in place; the pattern's values are read by nothing else;
- the `cat` has x's shape and dtype and is contiguous, as snlp::rotary's output is (the tables do
  not broadcast x any larger); the tables are tensors of x's dtype with at least one dim, so type
  promotion does not depend on the order of a product's operands;
- the new node carries the `cat`'s traced value.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
from torch.fx import Graph, Node

from ...fx import ops
from ...fx.values import example_value
from ...fx.writes import mutated_arg
from ...kernels import rotary as _rotary  # noqa: F401  (registers snlp::rotary)

logger = logging.getLogger("snlp_compile")

_MUL, _ADD, _SUB, _NEG, _CAT = ops.MUL, ops.ADD, ops.SUB, ops.NEG, ops.CAT

Term = tuple[bool, str, Node, Node]  # (negated, "x1" or "x2", x, table)


def _is(node: Any, targets: set) -> bool:
    """A call of one of `targets` with two tensor operands at most and no other arguments (no alpha)."""
    if not isinstance(node, Node) or node.op not in ("call_function", "call_method") or node.kwargs:
        return False
    return node.target in targets


def _half(node: Any) -> tuple[str, Node] | None:
    """("x1", x) for x[..., :d] and ("x2", x) for x[..., d:], d half of x's static last dim."""
    if not _is(node, {operator.getitem}) or not isinstance(node.args[0], Node):
        return None
    x, index = node.args
    value = example_value(x)
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or not isinstance(value.shape[-1], int):
        return None
    items = index if isinstance(index, tuple) else (index,)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = (*items[:at], *[slice(None)] * (value.dim() - len(items) + 1), *items[at + 1 :])
    whole = (slice(None),) * (value.dim() - 1)
    if len(items) != value.dim() or not all(isinstance(i, slice) for i in items) or items[:-1] != whole:
        return None
    d = value.shape[-1] // 2
    last = items[-1]
    if value.shape[-1] % 2 or last.step not in (None, 1):
        return None
    if last.start in (None, 0) and last.stop == d:
        return "x1", x
    if last.start == d and last.stop in (None, value.shape[-1]):
        return "x2", x
    return None


def _term(node: Any) -> Term | None:
    """A product of a half of x and a table, possibly negated (on the half or on the product)."""
    if _is(node, _NEG) and len(node.args) == 1:
        inner = _term(node.args[0])
        return None if inner is None else (not inner[0], *inner[1:])
    if not (_is(node, _MUL) and len(node.args) == 2):
        return None
    for operand, table in (node.args, node.args[::-1]):
        negated = _is(operand, _NEG) and len(operand.args) == 1
        half = _half(operand.args[0] if negated else operand)
        if half is not None and isinstance(table, Node):
            return negated, *half, table
    return None


def _sum(node: Any) -> list[Term] | None:
    """The two terms of a sum (a difference negates its second term)."""
    if (_is(node, _ADD) or _is(node, _SUB)) and len(node.args) == 2:
        terms = [_term(arg) for arg in node.args]
        if None not in terms:
            if _is(node, _SUB):
                terms[1] = (not terms[1][0], *terms[1][1:])
            return terms
    return None


def _match(cat: Node) -> tuple[Node, Node, Node] | None:
    """(x, cos, sin) of a rotary `cat`, else None."""
    if cat.op != "call_function" or cat.target not in _CAT or set(cat.kwargs) - {"dim"}:
        return None
    parts, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    value = example_value(cat)
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not isinstance(value, torch.Tensor):
        return None
    if dim not in (-1, value.dim() - 1):
        return None
    first, second = _sum(parts[0]), _sum(parts[1])
    if first is None or second is None:
        return None
    by_half = [{t[1]: t for t in terms} for terms in (first, second)]
    if any(set(terms) != {"x1", "x2"} for terms in by_half):
        return None
    (n1, _, x, cos), (n2, _, x_, sin) = by_half[0]["x1"], by_half[0]["x2"]
    (m1, _, x__, sin_), (m2, _, x___, cos_) = by_half[1]["x1"], by_half[1]["x2"]
    if not (x is x_ is x__ is x___ and cos is cos_ and sin is sin_) or (n1, n2, m1, m2) != (False, False, True, False):
        return None
    x_value, tables = example_value(x), [example_value(cos), example_value(sin)]
    if (tuple(value.shape), value.dtype) != (tuple(x_value.shape), x_value.dtype) or not value.is_contiguous():
        return None
    if not all(isinstance(t, torch.Tensor) and t.dim() >= 1 and t.dtype == x_value.dtype for t in tables):
        return None  # a 0-dim or other-dtype table promotes differently depending on the operand order
    return x, cos, sin


def _pattern_nodes(cat: Node, x: Node, tables: set[Node]) -> set[Node]:
    """Every node between x / the tables and the cat."""
    nodes, todo = set(), [cat]
    while todo:
        node = todo.pop()
        if node in nodes or node is x or node in tables:
            continue
        nodes.add(node)
        todo.extend(node.all_input_nodes)
    return nodes


def fuse_rotary(graph: Graph) -> int:
    """Replace every rotary pattern of `graph` in place (module docstring); returns how many."""
    fused = 0
    for cat in list(graph.nodes):
        match = _match(cat) if cat.op == "call_function" else None
        if match is None:
            continue
        x, cos, sin = match
        pattern = _pattern_nodes(cat, x, {cos, sin})
        if any(user not in pattern for node in pattern - {cat} for user in node.users):
            continue  # a value of the pattern is read elsewhere: it would still be computed
        order = {node: i for i, node in enumerate(graph.nodes)}
        first = min(pattern, key=order.__getitem__)
        if any(order[operand] > order[first] for operand in (x, cos, sin)):
            continue  # a table computed inside the pattern's span: the fused call would read it too early
        if any(mutated_arg(node) is not None for node in graph.nodes if order[first] <= order[node] <= order[cat]):
            continue
        with graph.inserting_before(first):
            new = graph.call_function(torch.ops.snlp.rotary.default, (x, cos, sin))
        new.meta = dict(cat.meta)
        cat.replace_all_uses_with(new)
        for node in sorted(pattern, key=order.__getitem__, reverse=True):
            graph.erase_node(node)
        fused += 1
    if fused:
        graph.lint()
        logger.debug("snlp: %d rotary embedding(s) as snlp::rotary", fused)
    return fused
