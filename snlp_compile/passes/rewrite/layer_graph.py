"""One layer as a standalone graph `(state, *inputs) -> state`, lowered for where it runs.

Invariants: the graph computes the layer's `state_out` from its state and inputs with the nodes'
traced values kept in `meta`; a graph run under vmap (`Where.BATCHED`) sends every tensor the layer
allocates and writes in place (its scratch) through `snlp::scratch`, a fresh copy per layer and
evaluation; the lowering list chooses each node's target and runs its graph passes.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.fx import Graph, GraphModule, Node

from ...fx.args import map_args
from ...fx.values import example_value
from ...fx.writes import written_roots
from ...kernels import scratch as _scratch  # noqa: F401  (registers snlp::scratch)
from ..analysis import Layer
from .lowering_list import LoweringList, Where


def _scratch_nodes(layer: Layer) -> set[Node]:
    """The tensors the layer allocates and writes in place (the layer's own `written_roots`); of an op that
    allocates several (`torch.sort`), the items read from it."""
    own = set(layer.nodes)
    roots = written_roots(layer.nodes, own) & own
    items = {u for r in roots for u in r.users if u in own and u.target is operator.getitem}
    return {n for n in roots | items if isinstance(example_value(n), Tensor)}


def layer_graph(
    root: GraphModule,
    layer: Layer,
    lowerings: LoweringList,
    where: Where,
    aliases: list[int] | None = None,
    copied: Sequence[int] = (),
    jacobian_nodes: Sequence[int] = (),
) -> GraphModule:
    """The layer as a standalone GraphModule (state, *layer.inputs) -> state (a tuple (state, *side
    outputs) for a layer with side outputs), for graphs of kind `where`
    (BATCHED or ONE_LAYER), lowered by `lowerings`. `aliases[k]`: the input slot whose placeholder the
    graph reads for input k (one that always holds the same value, `inputs.input_aliases`); `copied`:
    the inputs the layer writes that it writes as a fresh copy per evaluation, returned after the
    state and side outputs (`inputs.InputSlot` "copied"); `jacobian_nodes`: the layer nodes (indices in
    `layer.nodes`) a dynamic surrogate recipe needs (`SurrogateRecipe.dynamic_nodes`), returned last."""
    graph = Graph()
    state = graph.placeholder("state")
    inputs = [graph.placeholder(f"input_{k}") for k in range(len(layer.inputs))]
    for placeholder, node in zip((state, *inputs), (layer.state_in, *layer.inputs), strict=True):
        placeholder.meta = dict(node.meta)  # the traced values, which passes on the layer graph read
    aliases = aliases or list(range(len(inputs)))
    copies = {k: graph.call_method("clone", (inputs[aliases[k]],)) for k in copied}
    for k, copy in copies.items():
        copy.meta = dict(layer.inputs[k].meta)
    slot = {node: copies.get(k, inputs[aliases[k]]) for k, node in enumerate(layer.inputs)}
    env: dict[Node, Node] = {}
    own_copies = _scratch_nodes(layer) if where is Where.BATCHED else set()
    for node in layer.nodes:

        def remap(path: tuple, value: object, node: Node = node) -> object:
            if not isinstance(value, Node):
                return value
            if (node, path) in layer.state_uses:
                return state
            return env[value] if value in env else slot[value]

        args, kwargs = map_args(node, remap)
        op, target, extra = lowerings.target(node, where)
        env[node] = graph.create_node(op, target, args, {**kwargs, **extra}, name=node.name)
        env[node].meta = dict(node.meta)
        if node in own_copies:
            env[node] = graph.call_function(torch.ops.snlp.scratch.default, (env[node], state))
            env[node].meta = dict(node.meta)
    sides = [env[n] for n in layer.side_outputs] + list(copies.values())
    sides += [env[layer.nodes[i]] for i in jacobian_nodes]
    graph.output((env[layer.state_out], *sides) if sides else env[layer.state_out])
    lowerings.run_graph_passes(graph, where)
    return GraphModule(root, graph)
