"""What a lowering is, and the list the backend runs: one place decides which kernels a graph takes.

A lowering family retargets single nodes as the rewrite copies them (`retarget`) and/or runs a pass
over a finished graph (`graph_pass`). Each acts on one of three kinds of graph (`Where`): a layer
graph run under vmap for several layers at once, a layer graph called for one layer at a time, and
the rewritten graph around the stack.

Invariants: a `LoweringList` retargets a node by the first family that serves it, runs graph passes
in list order, and keeps every node's traced value (`node.meta`); it is chosen once, by the backend.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.fx import Graph, Node


class Where(enum.Enum):
    """The kind of graph a lowering acts on."""

    BATCHED = "a layer graph run under vmap"
    ONE_LAYER = "a layer graph called for one layer"
    OUTSIDE = "the graph around the stack"


Retarget = Callable[[Node, Where], "tuple[Any, dict[str, Any]] | None"]  # -> (new target, extra kwargs)


@dataclass(frozen=True)
class Lowering:
    """One pass family. `one_layer_differs`: it lowers a one-layer call differently from a batched one,
    so the rewrite builds a second layer graph for one-layer calls."""

    name: str
    retarget: Retarget | None = None
    graph_pass: Callable[[Graph, Where], object] | None = None
    one_layer_differs: bool = False


@dataclass(frozen=True)
class LoweringList:
    """The lowering families a backend chose, in the order they take precedence and run."""

    families: tuple[Lowering, ...] = ()

    @property
    def one_layer_graphs(self) -> bool:
        """Whether one-layer calls need a graph of their own."""
        return any(f.one_layer_differs for f in self.families)

    def target(self, node: Node, where: Where) -> tuple[str, Any, dict[str, Any]]:
        """(op, target, extra kwargs) that evaluates `node` in a graph of kind `where`."""
        for family in self.families:
            new = family.retarget(node, where) if family.retarget is not None else None
            if new is not None:
                return "call_function", new[0], new[1]
        return node.op, node.target, {}

    def run_graph_passes(self, graph: Graph, where: Where) -> None:
        """Run the families' graph passes on `graph` (of kind `where`) in list order."""
        for family in self.families:
            if family.graph_pass is not None:
                family.graph_pass(graph, where)

    def __str__(self) -> str:
        return ", ".join(f.name for f in self.families) or "none"
