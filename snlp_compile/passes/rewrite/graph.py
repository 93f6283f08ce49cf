"""Replace a detected layer stack by one structured-Newton solve.

Invariants of the rewritten graph:

- Every node outside the stack is kept, in its original order, except layer inputs that
  repeat an earlier one's value (each such value is computed once); the stack's state-dependent
  nodes are replaced by one `call_module` to a `StackProgram`, placed where the last layer's
  output was, whose value has the same meta as that output; with taps (states read outside the
  stack) it returns those states too, through getitems with their meta, and the nodes that read
  them before the stack's end (`checks.tap_readers`, pure by `check_taps`) move after it.
- Each layer group (layers of one structure) becomes one layer GraphModule
  `(state, *inputs) -> state`, evaluated for all its layers at once under `torch.vmap` with
  per-layer inputs stacked on a leading axis (`layer_graph`); where the lowering list lowers
  one-layer calls differently, each group also gets a graph for calls on one layer at a time
  (sequential layers, one-layer blocks). The lowering list chooses every kernel; the rewrite
  itself reads no option but the solve's.
- A tensor a layer allocates and writes in place (`fx.writes.alias_roots`) goes through
  `snlp::scratch` in the graph run under vmap: a fresh copy per layer and evaluation, which vmap
  can write per-layer values into.
- Per-layer inputs follow `inputs.plan_slots`: sliced without a copy where they are views of one
  tensor (`lambdas[i]`, `kv_cache.k[i]`); with `stack_in_graph` False, per-layer graph inputs
  (weights at inference) become new buffers of the graph kept up to date by `StackedWeights`;
  anything else is stacked inside the graph, so gradients reach each layer's own tensors.
- An input a layer writes in place is always a view slice, so writes reach the original tensor.
- Random draws and other impure ops outside the layer graphs are never merged or erased: each
  runs once per call, in the original order.
- The input GraphModule is not modified (the backend compiles it as is when it falls back).
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import Tensor, nn
from torch._dynamo.source import LocalSource
from torch.fx import Graph, GraphModule, Node

from ...fx.args import map_args
from ...fx.closures import backward_closure
from ...fx.equality import is_pure
from ...fx.values import example_value
from ...runtime.stack_program import StackProgram
from ...runtime.stacked_weights import StackedWeights
from ..analysis import Layer, LayerStackMatch, StackPlan
from ..analysis.checks import glue_nodes, tap_readers
from .inputs import InputSlot, canonical_inputs, input_aliases, plan_slots
from .layer_graph import layer_graph
from .lowering_list import LoweringList, Where

logger = logging.getLogger("snlp_compile")


def erase_unused(nodes: list[Node]) -> None:
    """Erase the `is_pure` nodes among `nodes` that nothing reads, and then what only they read (layer
    inputs replaced by their canonical copy, the parallel layers' own copies of inputs that
    per_group shares): an eager inner compiler would run them on every call. A random draw stays:
    it advances the generator that later draws read."""
    todo, erased = list(nodes), set()
    while todo:
        node = todo.pop()
        if not node.users and node not in erased and is_pure(node):
            todo.extend(node.all_input_nodes)
            node.graph.erase_node(node)
            erased.add(node)


def _graph_module_with(root: GraphModule, graph: Graph, added: dict[str, Tensor | nn.Module]) -> GraphModule:
    """GraphModule(root, graph) for a graph that also reads `added` (new buffers and submodules). `root`
    is left as it was, so the backend can still compile the original graph when it falls back."""
    registered = []
    try:
        for name, value in added.items():
            if isinstance(value, nn.Module):
                root.add_submodule(name, value)
            else:
                root.register_buffer(name, value, persistent=False)
            registered.append(name)
        return GraphModule(root, graph)
    finally:
        for name in registered:
            delattr(root, name)


def _program(
    gm: GraphModule, plan: StackPlan, lowerings: LoweringList, slots: list[list[InputSlot]], canonical
) -> StackProgram:
    """The StackProgram of the plan's layer groups, their graphs lowered by `lowerings`."""
    layers, groups = plan.match.layers, plan.match.groups
    aliases = [input_aliases(layers, m, canonical) for m in groups]
    copied = _copied(slots)

    def graphs(where: Where) -> list[GraphModule]:
        return [
            layer_graph(gm, layers[m[0]], lowerings, where, a, c, r.dynamic_nodes)
            for m, a, c, r in zip(groups, aliases, copied, plan.recipes, strict=True)
        ]

    one_layer = graphs(Where.ONE_LAYER) if lowerings.one_layer_graphs else None
    batched = [[slot.batched for slot in group] for group in slots]
    program = StackProgram(
        graphs(Where.BATCHED), one_layer, groups, batched, plan.recipes, plan.config, taps=plan.match.taps
    )
    program.side_outputs = [
        len(layer.side_outputs) + len(copied[program.group_of[p]]) for p, layer in enumerate(layers)
    ]
    return program


def _log_copied(match: LayerStackMatch, copied: list[list[int]]) -> None:
    """Say which inputs the layers write through per-evaluation copies (a cost: stacked and copied back
    on every call), by the first layer's name for them."""
    inputs = [match.layers[m[0]].inputs[k] for m, c in zip(match.groups, copied, strict=True) for k in c]
    names = [f"{n.args[0].name}[{n.args[1]}]" if n.target is operator.getitem else n.name for n in inputs]
    if names:
        logger.info(
            "snlp: the layers write %s through per-evaluation copies (one tensor per layer, or writes that do not "
            "only overwrite: stacked and copied back on each call)",
            ", ".join(names),
        )


def _copied(slots: list[list[InputSlot]]) -> list[list[int]]:
    """Per layer group, its "copied" input slots."""
    return [[k for k, slot in enumerate(group) if slot.kind == "copied"] for group in slots]


def _group_inputs(graph: Graph, slots: list[list[InputSlot]], cached: dict, env: dict, canonical) -> tuple:
    """Per layer group, the tuple of its input values in the new graph (the StackProgram's per_group)."""
    per_group = []
    for g, group in enumerate(slots):
        values = []
        for k, slot in enumerate(group):
            if slot.kind == "shared":
                values.append(env[canonical[slot.value]])
            elif slot.kind == "slice":
                values.append(graph.call_function(operator.getitem, (env[slot.value[0]], slot.value[1])))
            elif slot.kind == "cached":
                values.append(graph.get_attr(cached[(g, k)]))
            else:  # "stack" and "copied"
                values.append(graph.call_function(torch.stack, ([env[n] for n in slot.value],)))
        per_group.append(tuple(values))
    return tuple(per_group)


def _glue_read_outside(layer: Layer) -> set[Node]:
    """The first layer's glue that something outside the stack reads, with what it is computed from in the
    glue: a function of the stack's input, computed outside the stack as in the original graph too."""
    glue = set(glue_nodes(layer))
    read = {n for n in glue if any(u not in layer.nodes for u in n.users)}
    return read | backward_closure(read, glue)


def _copy(graph: Graph, node: Node, env: dict, lowerings: LoweringList) -> Node:
    """`node` copied into `graph` (arguments through `env`), retargeted where the lowering list says so
    (e.g. the LM head as one GEMV at decode)."""
    op, target, extra = lowerings.target(node, Where.OUTSIDE)
    if (op, target) == (node.op, node.target):
        return graph.node_copy(node, env.__getitem__)
    args, kwargs = map_args(node, lambda _, value: env[value] if isinstance(value, Node) else value)
    new = graph.create_node(op, target, args, {**kwargs, **extra}, name=node.name)
    new.meta = dict(node.meta)
    return new


def _bind_outputs(graph: Graph, call: Node, outputs: list, env: dict) -> None:
    """The StackProgram call's outputs in the new graph: env[node] for a node it computes (its value
    alone, or one getitem per output), and for ("copy", input) the layer's last copy of a "copied"
    input written back into that input."""
    nodes = [item[1] if isinstance(item, tuple) else item for item in outputs]
    if len(outputs) == 1:
        call.meta = dict(nodes[0].meta)
        env[nodes[0]] = call
        return
    call.meta = {"example_value": tuple(example_value(n) for n in nodes)}
    for k, (item, node) in enumerate(zip(outputs, nodes, strict=True)):
        value = graph.call_function(operator.getitem, (call, k))
        value.meta = dict(node.meta)
        if isinstance(item, tuple):
            graph.call_method("copy_", (env[node], value))
        else:
            env[node] = value


def rewrite_stack(
    gm: GraphModule, plan: StackPlan, lowerings: LoweringList, example_inputs: list, stack_in_graph: bool
) -> tuple[GraphModule, StackedWeights]:
    """The rewritten GraphModule and the stacked weight buffers it reads. `stack_in_graph`: per-layer
    weights are stacked inside the graph on each call (gradients reach them; exported graphs hold
    the stacking), not cached in buffers that `StackedWeights.refresh` keeps current."""
    layers = plan.match.layers
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    canonical = canonical_inputs(gm.graph, layers)
    slots = plan_slots(placeholders, plan.match, cache_graph_inputs=not stack_in_graph)
    copied = _copied(slots)
    _log_copied(plan.match, copied)
    graph, env, weights = Graph(), {}, StackedWeights()
    program = _program(gm, plan, lowerings, slots, canonical)
    added: dict[str, Tensor | nn.Module] = {"snlp_stack": program}
    cached: dict[tuple[int, int], str] = {}
    for node in placeholders:
        env[node] = graph.node_copy(node, env.__getitem__)
        if hasattr(node, "_dynamo_source"):  # aot_autograd reads static inputs (CUDA graphs) from it
            env[node]._dynamo_source = node._dynamo_source
    for g, group in enumerate(slots):
        for k, slot in enumerate(group):
            if slot.kind == "cached":
                cached[(g, k)] = f"snlp_stacked_g{g}_i{k}"
                added[cached[(g, k)]] = weights.add(slot.value, example_inputs)
    stack_nodes = {n for layer in layers for n in layer.nodes} - _glue_read_outside(layers[0])
    last = layers[-1].state_out
    deferred = tap_readers(layers, plan.match.taps)  # they read a tapped state: after the solve
    for node in gm.graph.nodes:
        if node.op == "placeholder" or (node in stack_nodes and node is not last) or node in deferred:
            continue
        if node is not last:
            env[node] = _copy(graph, node, env, lowerings)
            continue
        # `solve` calls layers one at a time only for the n_seq sequential ones; the parallel
        # layers read their inputs through per_group.
        per_layer = tuple(tuple(env[canonical[n]] for n in layer.inputs) for layer in layers[: plan.config.n_seq])
        per_group = _group_inputs(graph, slots, cached, env, canonical)
        out = graph.call_module("snlp_stack", (env[layers[0].state_in], per_layer, per_group))
        sides = [
            item
            for p, layer in enumerate(layers)
            for item in (*layer.side_outputs, *(("copy", layer.inputs[k]) for k in copied[program.group_of[p]]))
        ]
        _bind_outputs(graph, out, [last, *(layers[p].state_out for p in plan.match.taps), *sides], env)
        for reader in deferred:
            env[reader] = _copy(graph, reader, env, lowerings)
    # after the whole graph is copied: what follows the stack may read a layer's input too
    erase_unused([env[n] for layer in layers for n in layer.inputs if n in env])
    lowerings.run_graph_passes(graph, Where.OUTSIDE)
    new_gm = _graph_module_with(gm, graph, added)
    new_gm.graph.lint()
    # aot_autograd treats a graph as dynamo's (static parameters and marked inputs: CUDA graphs
    # without copies) by its meta and the sources of its parameters.
    new_gm.meta.update(gm.meta)
    sources = dict(getattr(gm, "_param_name_to_source", None) or {})
    for name, _ in new_gm.named_buffers():
        if name.startswith("snlp_stacked_"):
            sources[name] = LocalSource(name)
    new_gm._param_name_to_source = sources
    return new_gm, weights
