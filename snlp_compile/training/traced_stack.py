"""A model's layer stack as the compiler's analysis sees it, callable on a new forward's inputs.

`trace_stack` captures the model's dynamo graph once per input structure and runs the compiler's
own `analyse` on it; the result gives, for the inputs of any later forward with that structure,
each layer's side inputs and each layer as a function `(state, *inputs) -> state` (its glue
included: x0 mixing belongs to the layer after it), with the surrogate J read off the graph.

Invariants: the layer functions are the rewrite's own layer graphs (no lowering), so they compute
exactly what the model's layers compute; side inputs are recomputed from the forward's own
parameters and inputs (`fx.capture.graph_inputs`), so gradients reach them; nothing of the stack
itself is recomputed here; no layer writes in place to what it reads (a KV cache): ValueError.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import Graph, GraphModule, Node

from ..config import SNLPConfig
from ..fx.capture import capture_graphs, graph_inputs
from ..fx.closures import backward_closure
from ..fx.writes import written_roots
from ..passes.analysis import LayerStackMatch, NotAStack, analyse
from ..passes.analysis.stack import module_paths
from ..passes.rewrite import LoweringList, Where
from ..passes.rewrite.layer_graph import layer_graph
from ..solver import Surrogate
from ..solver.recipe import SurrogateRecipe, stack_surrogate

logger = logging.getLogger("snlp_compile")


def _inputs_program(gm: GraphModule, match: LayerStackMatch) -> tuple[GraphModule, list[Node]]:
    """A graph computing, from gm's inputs, layer 0's state and every layer's side inputs (what they are
    computed from, nothing of the stack); returns it and its output nodes (in gm's graph)."""
    wanted = [match.layers[0].state_in, *dict.fromkeys(n for layer in match.layers for n in layer.inputs)]
    needed = backward_closure(set(wanted)) | set(wanted)
    graph, env = Graph(), {}
    for node in gm.graph.nodes:
        if node.op == "placeholder" or node in needed:
            env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(tuple(env[n] for n in wanted))
    return GraphModule(gm, graph), wanted


@dataclass
class TracedStack:
    """The analysed stack of one input structure; `blocks[l]`: the module of layer l (for hooks)."""

    graph: GraphModule
    match: LayerStackMatch
    recipes: list[SurrogateRecipe]
    layers: list[GraphModule]
    inputs_program: GraphModule
    outputs: list[Node]
    blocks: list[nn.Module | None]

    def __len__(self) -> int:
        return len(self.layers)

    def layer(self, position: int, state: Tensor, inputs: list[Any]) -> Tensor:
        """Layer `position` on `state`: its new state (side outputs, such as a cache's keys, dropped)."""
        out = self.layers[position](state, *inputs)
        return out[0] if isinstance(out, tuple) else out

    def side_inputs(self, model: nn.Module, args: Sequence[Any], kwargs: dict) -> tuple[Tensor, list[list[Any]]]:
        """(layer 0's state, each layer's side inputs) for the forward `model(*args, **kwargs)`."""
        values = self.inputs_program(*graph_inputs(self.graph, model, args, kwargs))
        by_node = dict(zip(self.outputs, values, strict=True))
        return values[0], [[by_node[n] for n in layer.inputs] for layer in self.match.layers]

    def surrogate(self, inputs: list[list[Any]], first: int) -> Surrogate:
        """J of the layers from `first` on, from their side inputs."""
        positions = range(first, len(self.layers))
        singletons = [[i] for i in range(len(positions))]
        return stack_surrogate([self.recipes[p] for p in positions], [inputs[p] for p in positions], singletons)


def _block(model: nn.Module, container: str, index: int) -> nn.Module | None:
    """The module `container`[index] (a dynamo path from the traced call's `self`), None if not found."""
    prefix = "L['self']"
    if not container.startswith(prefix):
        return None
    for path in module_paths(container, index):
        with contextlib.suppress(AttributeError):
            return model.get_submodule(path[len(prefix) + 1 :])
    return None


def trace_stack(model: nn.Module, args: Sequence[Any], kwargs: dict, config: SNLPConfig, who: str) -> TracedStack:
    """Analyse the stack of `model(*args, **kwargs)`; ValueError (naming `who`) when there is none or it
    cannot be re-run (a layer writes a KV cache)."""
    graphs: list[GraphModule] = []
    with torch.no_grad():
        capture_graphs(model, args, kwargs, graphs.append, first_only=True)
    found, reasons = None, []
    for gm in graphs:
        try:
            found = (gm, analyse(gm, config))
            break
        except NotAStack as why:
            reasons.append(str(why))
    if found is None:
        why = "; ".join(reasons) or "dynamo captured no graph"
        raise ValueError(f"{who}: the compiler finds no layer stack in {type(model).__name__}: {why}")
    gm, plan = found
    match = plan.match
    for layer in match.layers:
        written = written_roots(layer.nodes, set(layer.nodes)) - set(layer.nodes)
        if written:
            raise ValueError(
                f"{who}: layer {match.container}.{layer.module_index} writes {sorted(n.name for n in written)} in "
                "place (a KV cache?): the regulariser calls each layer again, which would write it twice; regularise "
                "training forwards without a cache"
            )
    program, outputs = _inputs_program(gm, match)
    recipes = [plan.recipes[next(g for g, m in enumerate(match.groups) if p in m)] for p in range(len(match.layers))]
    if any(r.dynamic_nodes for r in recipes):
        logger.info(
            "%s: the stream mixing depends on the state (dynamic); the regulariser's solve takes its "
            "state-independent part as J (the compiled solve takes H at each iterate)",
            who,
        )
    return TracedStack(
        graph=gm,
        match=match,
        recipes=[r.static() for r in recipes],
        layers=[layer_graph(gm, layer, LoweringList(), Where.ONE_LAYER) for layer in match.layers],
        inputs_program=program,
        outputs=outputs,
        blocks=[_block(model, match.container, layer.module_index) for layer in match.layers],
    )
