"""`TracedVmap`: a vmapped function that, run eagerly, replays a trace of itself.

Run eagerly, `torch.vmap(f)` sends every op of `f` through functorch's batching layer on every
call: host time that the eager inner compiler pays once per op and call. A `TracedVmap` run
eagerly replays instead a `make_fx` trace of the vmapped function, recorded once per signature:
the aten ops vmap's batching rules chose, without the per-op batching dispatch, and without the
views that change nothing (`simplify_views`: 103 -> 60 ops for a paper-0.5b layer)
(benchmarks/RESULTS.md, "Eager against eager"). It calls vmap itself wherever a replay could
differ: while anything traces, records gradients or transforms (compilers, autograd, an
enclosing vmap, torch.jit tracing), under autocast, with an argument that is neither a tensor
nor None (an int that changes every decode step would need a trace per value), and for a
signature whose trace failed.

Invariants: a signature holds what a trace depends on (each argument's shape, strides, dtype
and device, which arguments are the same tensor, and the enabled SDPA backends), and a trace is
only replayed for its own signature, so a replay runs the ops vmap would run, in the same order;
at most `max_traces` traces are kept (the least recently used is dropped first).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..fx.values import traced_tensor

logger = logging.getLogger("snlp_compile")

_PLAIN = (Tensor, nn.Parameter)
_FAILED = object()  # a signature make_fx could not trace: vmap runs it


def _signature(args: Sequence[Tensor | None]) -> Hashable:
    first = {}
    aliasing = tuple(first.setdefault(id(a), i) for i, a in enumerate(args))
    tensors = tuple(None if a is None else (tuple(a.shape), a.stride(), a.dtype, a.device) for a in args)
    sdpa = tuple(
        f()
        for f in (
            torch.backends.cuda.flash_sdp_enabled,
            torch.backends.cuda.mem_efficient_sdp_enabled,
            torch.backends.cuda.math_sdp_enabled,
            torch.backends.cuda.cudnn_sdp_enabled,
        )
    )
    return tensors, aliasing, sdpa


def runs_eagerly(values: Sequence[Any]) -> bool:
    """The call executes now on plain tensors: nothing traces it, records it, transforms it or
    autocasts it."""
    tensors = [v for v in values if isinstance(v, Tensor)]
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None:
        return False
    if torch._C._are_functorch_transforms_active() or any(map(torch.is_autocast_enabled, ("cpu", "cuda"))):
        return False
    if any(type(t) not in _PLAIN or torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


class TracedVmap:
    """`torch.vmap(fn, in_dims, randomness="different")`, replayed from per-signature traces when
    run eagerly (see the module docstring)."""

    def __init__(self, fn: Callable, in_dims: tuple, max_traces: int = 16):
        if max_traces < 1:
            raise ValueError(f"TracedVmap.max_traces must be >= 1, got {max_traces}")
        self.fn, self.in_dims, self.max_traces = fn, in_dims, max_traces
        self.vmapped = torch.vmap(fn, in_dims=in_dims, randomness="different")
        self.traces: dict[Hashable, GraphModule | object] = {}

    def __reduce__(self) -> tuple:
        """Pickled as its arguments (inductor pickles the graph that holds it for its cache key; the
        vmap closure and the traces cannot be pickled and are rebuilt)."""
        return TracedVmap, (self.fn, self.in_dims, self.max_traces)

    def __call__(self, *args: Any) -> Any:
        if not all(a is None or isinstance(a, Tensor) for a in args) or not runs_eagerly(args):
            return self.vmapped(*args)
        key = _signature(args)
        trace = self.traces.pop(key, None)
        if trace is None:
            if len(self.traces) >= self.max_traces:
                self.traces.pop(next(iter(self.traces)))
            trace = self._trace(args)
        self.traces[key] = trace  # last: the most recently used
        return self.vmapped(*args) if trace is _FAILED else trace(*args)

    def _trace(self, args: tuple) -> GraphModule | object:
        logger.debug("snlp: tracing a batched layer call for the eager inner compiler (%d kept)", len(self.traces))
        try:
            trace = make_fx(self.vmapped, tracing_mode="fake")(*args)
        except Exception as error:  # noqa: BLE001  (whatever make_fx rejects, vmap still runs)
            logger.info("snlp: batched layer calls of this signature run through vmap: make_fx failed (%s)", error)
            return _FAILED
        simplify_views(trace)
        return trace


_VIEWS = {
    torch.ops.aten.view.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.expand.default,
    torch.ops.aten.permute.default,
    torch.ops.aten.transpose.int,
    torch.ops.aten.alias.default,
    torch.ops.aten.slice.Tensor,
}
_RESHAPES = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default}


def _layout(node: object) -> tuple | None:
    value = traced_tensor(node)
    return None if value is None else (value.shape, value.stride(), value.storage_offset(), value.dtype)


def simplify_views(gm: GraphModule) -> int:
    """Fewer view ops in a traced graph, each of which costs a dispatch when replayed eagerly (vmap's
    batching rules emit many): a view whose result has its input's layout (shape, strides, storage
    offset) is dropped, a reshape of a reshape of a contiguous tensor reshapes that tensor at once,
    and repeated views of one tensor become one. Every view aliases its input, so readers see the
    same memory in the same layout. A graph with an op that changes a tensor's layout in place
    (`transpose_`, `resize_`: tagged inplace_view) is left as it is. Returns how many nodes were erased."""
    graph, seen, erased = gm.graph, {}, 0
    if any(torch.Tag.inplace_view in getattr(node.target, "tags", ()) for node in graph.nodes):
        return 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _VIEWS or not isinstance(node.args[0], Node):
            continue
        source = node.args[0]
        if node.target in _RESHAPES and source.op == "call_function" and source.target in _RESHAPES:
            inner = source.args[0]
            value = traced_tensor(inner)
            if value is not None and value.is_contiguous():
                node.args, source = (inner, *node.args[1:]), inner
        key = repr((node.target, node.args, node.kwargs))  # args hold lists; nodes print as their unique names
        layout = _layout(node)
        replacement = source if layout is not None and layout == _layout(source) else seen.get(key)
        if replacement is None:
            seen[key] = node
            continue
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        erased += 1
    for node in reversed(list(graph.nodes)):  # views that only folded reshapes read
        if node.op == "call_function" and node.target in _VIEWS and not node.users:
            graph.erase_node(node)
            erased += 1
    if erased:
        gm.recompile()
    return erased
