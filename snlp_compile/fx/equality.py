"""When two nodes compute the same value.

Invariant: `same_value` is never true for two calls with an effect (an in-place write, a random
draw, anything FX counts as impure): each of those runs once per call of the graph.
"""

from __future__ import annotations

from torch.fx import Node

from .randomness import random_op
from .writes import mutated_arg


def is_pure(node: Node) -> bool:
    """A call whose value is a function of its arguments alone, with no effect: it writes nothing in
    place, draws no random numbers and has no side effect."""
    calls = node.op in ("call_function", "call_method")
    return calls and mutated_arg(node) is None and random_op(node) is None and not node.is_impure()


def same_value(a: object, b: object) -> bool:
    """a and b compute the same value: the same node, or the same `is_pure` op on the same values (two
    random draws never do)."""
    if a is b:
        return True
    if not isinstance(a, Node) or not isinstance(b, Node):
        return type(a) is type(b) and not isinstance(a, Node) and a == b
    if (a.op, a.target) != (b.op, b.target) or not is_pure(a):
        return False
    if len(a.args) != len(b.args) or a.kwargs.keys() != b.kwargs.keys():
        return False
    pairs = [*zip(a.args, b.args, strict=True), *((a.kwargs[k], b.kwargs[k]) for k in a.kwargs)]
    return all(same_value(x, y) for x, y in pairs)
