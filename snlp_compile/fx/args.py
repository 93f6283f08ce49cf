"""Walk and rebuild a node's arguments.

Invariant: a position (`path`) names one leaf of a node's args and kwargs as ("args", i, ...) or
("kwargs", name, ...), descending into lists, tuples, dicts and slices (as torch.fx's own
`map_arg` does), the same for `flat_args`, `map_args` and every pass that records uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.fx import Node

# A use of a node: (user node, position of the argument in the user's flattened args/kwargs).
Use = tuple[Node, tuple]

_SLICE_PARTS = ("start", "stop", "step")


def leaves(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(position, leaf) of every leaf of a nested argument value."""
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from leaves(item, (*path, i))
    elif isinstance(value, dict):
        for k, item in value.items():
            yield from leaves(item, (*path, k))
    elif isinstance(value, slice):
        for part in _SLICE_PARTS:
            yield from leaves(getattr(value, part), (*path, part))
    else:
        yield path, value


def rebuild(value: Any, fn: Callable[[tuple, Any], Any], path: tuple = ()) -> Any:
    """A nested argument value with every leaf replaced by fn(position, leaf)."""
    if isinstance(value, (list, tuple)):
        return type(value)(rebuild(item, fn, (*path, i)) for i, item in enumerate(value))
    if isinstance(value, dict):
        return {k: rebuild(item, fn, (*path, k)) for k, item in value.items()}
    if isinstance(value, slice):
        return slice(*(rebuild(getattr(value, part), fn, (*path, part)) for part in _SLICE_PARTS))
    return fn(path, value)


def flat_args(node: Node) -> Iterator[tuple[tuple, Any]]:
    """Leaves of a node's args and kwargs with their positions."""
    yield from leaves(node.args, ("args",))
    yield from leaves(node.kwargs, ("kwargs",))


def map_args(node: Node, fn: Callable[[tuple, Any], Any]) -> tuple[tuple, dict]:
    """Rebuild a node's (args, kwargs) with every leaf replaced by fn(position, leaf)."""
    return rebuild(node.args, fn, ("args",)), rebuild(node.kwargs, fn, ("kwargs",))


def first_node(path: tuple, value: Any) -> tuple[tuple, Node] | None:
    """(path, node) of `value` if it is a node, else of the first node in it if it is a list or tuple."""
    if isinstance(value, (list, tuple)):
        return next((((*path, j), item) for j, item in enumerate(value) if isinstance(item, Node)), None)
    return (path, value) if isinstance(value, Node) else None
