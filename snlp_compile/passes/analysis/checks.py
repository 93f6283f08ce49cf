"""The checks a detected stack must pass before the rewrite may replace it.

Invariants (each failure raises `NotAStack` naming the node and the reason):

- one global state (grad mode, autocast, ...) holds over the whole stack;
- in a differentiated graph, the state's gradient flows through every layer;
- the state keeps its shape and dtype; no layer reads a value computed from the stack other than
  through its state; no layer draws random numbers; in-place writes go to a layer's own tensors or
  per-layer inputs, never to its state or to an input other layers read.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch.fx import Node
from torch.utils import _pytree as pytree

from ...fx.closures import backward_closure, forward_closure
from ...fx.equality import is_pure
from ...fx.randomness import random_op
from ...fx.values import example_value, value_signature
from ...fx.writes import alias_roots, written_arg
from .stack import Layer, NotAStack, layer_key

# What dynamo records of a context manager that sets global state for the ops traced inside it
# (torch.no_grad, torch.autocast, ...): the call that sets the state -> the state it sets.
_GLOBAL_STATE_CALLS = {
    "torch._C._set_grad_enabled": "grad mode",
    "torch.amp.autocast_mode._enter_autocast": "autocast state",
    "torch.amp.autocast_mode._exit_autocast": "autocast state",
    "torch.autograd.grad_mode._enter_inference_mode": "inference mode",
    "torch.autograd.grad_mode._exit_inference_mode": "inference mode",
    "torch._C._set_fwd_grad_enabled": "forward-AD state",
    "torch._functorch.predispatch._enter_dual_level": "forward-AD state",
    "torch._functorch.predispatch._exit_dual_level": "forward-AD state",
    "torch.nn.attention._sdpa_kernel": "SDPA backend",
}


def _resolve(path: str) -> Any:
    """The object a dotted path names, or None where this torch version lacks it."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


_GLOBAL_STATE: dict[Any, str] = {
    call: state for path, state in _GLOBAL_STATE_CALLS.items() if (call := _resolve(path)) is not None
}


def _check_one_global_state(container: str, layers: list[Layer]) -> None:
    """Every stack node runs under one global state (grad mode, autocast, ...), the one the rewrite's
    single call of the stack runs under: no region of dynamo's graph begins or ends between the
    stack's first and last node (a region around the whole stack is fine)."""
    stack = {n for layer in layers for n in layer.nodes}
    started, change = False, None
    for node in layers[0].state_out.graph.nodes:
        if node in stack:
            if change is not None:
                first, last = layers[0].module_index, layers[-1].module_index
                raise NotAStack(
                    f"the {_GLOBAL_STATE[change.target]} changes inside the stack {container}[{first}..{last}] "
                    f"(at {change.name}); the rewrite runs the whole stack under one state"
                )
            started = True
        elif started and node.op == "call_function" and node.target in _GLOBAL_STATE:
            change = change or node


def _requires_grad(node: Node) -> bool:
    """Some tensor of the node's traced value requires grad (the graph is differentiated through it)."""
    return any(t.requires_grad for t in pytree.tree_leaves(example_value(node)) if isinstance(t, torch.Tensor))


def _check_gradient_flow(container: str, layers: list[Layer]) -> None:
    """Where the stack is differentiated, a layer whose state requires grad passes that gradient on:
    an op that stops it on every path (`x.detach()` between layers) would be bypassed by the Newton
    corrections, which carry the state's gradient around the layer function; eager gives what lies
    before the stop no gradient at all. (At inference nothing requires grad, and a detach changes nothing.)"""
    if not any(_requires_grad(n) for layer in layers for n in layer.nodes):
        return
    for layer in layers:
        if not _requires_grad(layer.state_in):
            continue
        users = {u for u, _ in layer.state_uses}
        carries, stops = set(), []  # nodes the state's gradient reaches; nodes it stops at
        for node in layer.nodes:
            if node in users or carries.intersection(node.all_input_nodes):
                (carries.add if _requires_grad(node) else stops.append)(node)
        if layer.state_out not in carries:
            stop = stops[0] if stops else layer.state_out
            raise NotAStack(
                f"{stop.name} ({getattr(stop.target, '__name__', stop.target)}) in layer {container}."
                f"{layer.module_index} stops the gradient of the state in a differentiated graph: the Newton "
                "corrections would carry it around the stop"
            )


def check_chain(container: str, layers: list[Layer]) -> None:
    _check_one_global_state(container, layers)
    _check_gradient_flow(container, layers)
    inside = set().union(*(set(layer.nodes) for layer in layers))
    downstream = forward_closure(inside) | inside  # what any layer node (glue too) flows into
    for layer in layers:
        own = set(layer.nodes)
        shape_in, shape_out = value_signature(layer.state_in), value_signature(layer.state_out)
        if shape_in != shape_out:
            raise NotAStack(
                f"layer {container}.{layer.module_index} changes the state from {shape_in[1:]} to {shape_out[1:]}"
            )
        for node in layer.inputs:
            if node in downstream:
                raise NotAStack(
                    f"layer {container}.{layer.module_index} reads {node.name}, which is computed from the stack "
                    "other than through its input: not a chain"
                )
        for node in layer.nodes:
            if (name := random_op(node)) is not None:
                raise NotAStack(
                    f"{node.name} in layer {container}.{layer.module_index} draws random numbers ({name}): each "
                    "Newton iteration would draw new ones, so no iteration count reproduces the model (dropout: "
                    "put the model in eval mode or set its probability to 0)"
                )
            written = written_arg(node)
            if written is None:
                continue
            # a write to a tensor the layer allocates (a root in `own`) is its own; to a per-layer input, rewritten
            path, target = written
            roots = alias_roots(target, own)
            if (node, path) in layer.state_uses or layer.state_in in roots:
                raise NotAStack(f"{node.name} in layer {container}.{layer.module_index} writes its state in place")
            read = next((r for r in roots for other in layers if other is not layer and r in other.inputs), None)
            if read is not None:
                raise NotAStack(
                    f"{node.name} in layer {container}.{layer.module_index} writes {read.name}, which other layers read"
                )


def glue_nodes(layer: Layer) -> list[Node]:
    """The layer's nodes outside its module (the parent loop's glue before it: x0 mixing, a cast)."""
    return [n for n in layer.nodes if layer_key(n) is None]


def tap_readers(layers: list[Layer], taps: list[int]) -> list[Node]:
    """The nodes the rewrite runs after the solve, which gives them their values, in graph order: those
    outside the stack that come before its last node and read a tapped state or a side output, and the
    glue between a tapped state and a reader outside (recomputed from the tapped state)."""
    inside = {n for layer in layers for n in layer.nodes}
    sides = {n for layer in layers for n in layer.side_outputs}
    readers = forward_closure({layers[p].state_out for p in taps} | sides) - inside
    glue = {n for p in taps for n in glue_nodes(layers[p + 1])}
    read = {n for n in glue if any(u not in inside for u in n.users)}
    readers |= read | backward_closure(read, glue)
    order = {n: i for i, n in enumerate(layers[-1].state_out.graph.nodes)}
    end = order[layers[-1].state_out]
    return sorted((n for n in readers if order[n] < end), key=order.__getitem__)


def check_taps(container: str, layers: list[Layer], taps: list[int]) -> None:
    """What reads a tapped state before the stack ends moves after the solve: it must have no effect (a
    random draw or an in-place write would be reordered against the stack's own)."""
    for node in tap_readers(layers, taps):
        if not is_pure(node):
            raise NotAStack(
                f"{node.name} reads a state inside the stack {container} and has an effect (an in-place write, a "
                "random draw or a module call): running it after the parallel solve would reorder it"
            )
