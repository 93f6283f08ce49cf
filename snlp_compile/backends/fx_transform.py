"""`snlp_transform`: the SNLP rewrite for GraphModules of existing FX pipelines (no dynamo).

Routes:

- `torch.export.export(model, args).module()`: aten-level graph, parameters as `get_attr`,
  `nn_module_stack` on every traced node; the pytree calling convention is kept. This is the
  route for the reference models.
- `torch.fx.symbolic_trace(model)`: nodes carry `nn_module_stack` but no values and hide
  parameters in `call_module` leaves, so the graph is first exported (which keeps the module
  paths and adds the values). `symbolic_trace` itself cannot trace the reference GPT: its input
  checks are Python control flow on tensor properties; use torch.export there.
- Graphs without `nn_module_stack` (make_fx, AOT graphs) have no module paths to find the stack
  by: the fallback applies (SNLPFallbackError with fallback="error").

Invariants: the input GraphModule is not modified (the rewrite works on a copy that shares
its parameters); the result is a plain GraphModule for the pipeline's own compiler, so
`config.inner` and `config.cudagraphs` do not apply. Per-layer weights are `get_attr` nodes and
are stacked inside the graph on each call, which keeps them current and lets gradients reach
them (the dynamo backend caches its stacks instead). The surrogate pass reads the layers' skip
paths as Python-level ops; where it cannot read them off an aten graph it logs so and uses IDN,
which is exact at the same K and only converges more slowly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import Graph, GraphModule

from ..config import SNLPConfig
from ..passes.analysis import NotAStack, analyse
from ..passes.rewrite import rewrite_stack
from .fallback import fall_back, log_rewrite
from .lowerings import choose_lowerings

logger = logging.getLogger("snlp_compile")


def _has_values(gm: GraphModule) -> bool:
    return any("val" in n.meta or "example_value" in n.meta for n in gm.graph.nodes if n.op != "output")


def _working_copy(gm: GraphModule) -> GraphModule:
    """A GraphModule with a copy of gm's graph (node meta copied) sharing gm's parameters.

    torch.export attributes its input-guard call (`_guards_fn`) to the module of the first
    traced op, which may be layer 0; that call belongs to no layer, so its module path is dropped.
    """
    graph = Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph._codegen = gm.graph._codegen
    for node in graph.nodes:
        if node.op == "call_module" and node.target == "_guards_fn":
            node.meta.pop("nn_module_stack", None)
    return GraphModule(gm, graph)


def snlp_transform(
    gm: GraphModule, example_inputs: Sequence[Any], config: SNLPConfig | dict | None = None
) -> GraphModule:
    """The SNLP rewrite of `gm` (see the module docstring for the supported routes).

    `example_inputs` are the positional inputs gm is called with. A graph the passes cannot
    prove safe is returned unmodified with one log line (fallback="warn") or raises
    SNLPFallbackError (fallback="error"); a wrong configuration raises ValueError, anything but a
    GraphModule TypeError.
    """
    if not isinstance(gm, GraphModule):
        raise TypeError(
            f"snlp_transform takes a torch.fx.GraphModule, got {type(gm).__name__}: pass "
            "torch.export.export(model, args).module() or torch.fx.symbolic_trace(model), or compile the module "
            "itself with torch.compile(model, backend='snlp')"
        )
    config = SNLPConfig.from_options(config)
    if not _has_values(gm):
        gm = torch.export.export(gm, tuple(example_inputs)).module()
    work = _working_copy(gm)
    try:
        if not any("nn_module_stack" in n.meta for n in work.graph.nodes):
            raise NotAStack(
                "the graph carries no nn_module_stack metadata (make_fx and AOT graphs drop it); trace the model "
                "with torch.export.export(model, args).module() or torch.fx.symbolic_trace"
            )
        plan = analyse(work, config)
        lowerings = choose_lowerings(plan.config, differentiable=True)
        new_gm, _ = rewrite_stack(work, plan, lowerings, list(example_inputs), stack_in_graph=True)
    except NotAStack as why:
        fall_back(config, f"cannot rewrite this graph: {why}", f"returning this graph unmodified: {why}")
        return gm
    new_gm.graph._codegen = work.graph._codegen
    new_gm.recompile()
    log_rewrite(plan, lowerings)
    return new_gm
