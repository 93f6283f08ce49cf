"""Capture the dynamo graphs of one model call, and rebuild a captured graph's inputs for a new call.

Invariants: capturing compiles a fresh copy of one small function (`fresh_function`), so its graphs
are dropped with it and no other compile of the process changes; every placeholder of a captured
graph carries the dynamo source it was read from (`L['self']._modules['blocks']...`,
`L['args'][0]`), which `graph_inputs` evaluates against a new (model, args, kwargs) exactly as
dynamo's own guards do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from ..fresh_code import fresh_function
from .values import example_value


def _call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """`self(*args, **kwargs)`; named `self` so that dynamo's sources (L['self'].blocks) read as a module's."""
    return self(*args, **kwargs)


class _Captured(Exception):
    """Stops the call after its first graph is captured (nothing of it runs)."""


def capture_graphs(
    model: nn.Module,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    on_graph: Callable[[GraphModule], None],
    first_only: bool = False,
) -> int:
    """Trace `model(*args, **kwargs)` with dynamo and pass each graph to `on_graph`; returns the number
    of graphs (0 where dynamo ran the call without one). The call runs (its graphs eagerly) unless
    `first_only`: then tracing stops at the first graph and nothing runs, so no input (a KV cache)
    is written."""
    count = 0

    def capture(gm: GraphModule, inputs: Sequence) -> Callable:
        nonlocal count
        count += 1
        on_graph(gm)
        if first_only:
            raise _Captured
        return gm.forward

    try:
        torch.compile(fresh_function(_call), backend=capture)(model, *args, **kwargs)
    except torch._dynamo.exc.BackendCompilerFailed as failure:
        if not isinstance(failure.inner_exception, _Captured):
            raise
    return count


def source_name(source: Any) -> str:
    """The expression a dynamo source reads its value with (L['self']._modules[...]...)."""
    name = source.name
    return name() if callable(name) else name  # a method in older torch releases


def graph_inputs(gm: GraphModule, model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> list[Any]:
    """The values of gm's placeholders for the call `model(*args, **kwargs)` (a graph `capture_graphs`
    captured from a call with the same structure); ValueError for a placeholder without a source."""
    from torch._dynamo.guards import _get_closure_vars

    scope = {"L": {"self": model, "args": tuple(args), "kwargs": dict(kwargs)}}
    helpers = dict(_get_closure_vars())
    values = []
    for node in (n for n in gm.graph.nodes if n.op == "placeholder"):
        source = getattr(node, "_dynamo_source", None)
        if source is None:
            raise ValueError(f"the captured graph's input {node.name} has no dynamo source to rebuild it from")
        value = eval(source_name(source), helpers, scope)  # noqa: S307  (dynamo's own guard expressions)
        traced = example_value(node)
        if isinstance(traced, torch.Tensor) and isinstance(value, (int, float, bool)):  # an unspecialised scalar,
            value = torch.tensor(value, dtype=traced.dtype)  # which dynamo passes to its graph as a 0-d tensor
        values.append(value)
    return values
