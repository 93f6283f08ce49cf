"""Transitive closures over a graph's data flow."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch.fx import Node


def _closure(starts: set[Node], within: set[Node] | None, step: Callable[[Node], Iterable[Node]]) -> set[Node]:
    seen, todo = set(), list(starts)
    while todo:
        for node in step(todo.pop()):
            if node not in seen and (within is None or node in within):
                seen.add(node)
                todo.append(node)
    return seen


def forward_closure(starts: set[Node], within: set[Node] | None = None) -> set[Node]:
    """The nodes computed from `starts` (not `starts` themselves), within `within` if given."""
    return _closure(starts, within, lambda node: node.users)


def backward_closure(starts: set[Node], within: set[Node] | None = None) -> set[Node]:
    """The nodes `starts` are computed from (not `starts` themselves), within `within` if given."""
    return _closure(starts, within, lambda node: node.all_input_nodes)
