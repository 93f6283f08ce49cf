"""analyse(): a graph and a configuration -> the typed plan every later stage works from.

Invariants of a `StackPlan`: `match` passed every check of `detect`; `recipes[g]` is the surrogate
of `match.groups[g]`; `config` is the one to apply to the detected stack (leading layers the
detector left out count towards n_seq, `iters` is capped where more change nothing: `capped`
says so for the log line, "" when nothing was capped).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import GraphModule

from ...config import SNLPConfig
from ...fx.views import merge_repeated_views
from ...solver import pinned_states, useful_iters
from ...solver.recipe import SurrogateRecipe
from .detect import detect_layer_stack
from .stack import LayerStackMatch, NotAStack
from .surrogate import choose_recipe


@dataclass
class StackPlan:
    """What the rewrite replaces and how: the stack, its surrogate recipes and the configuration."""

    match: LayerStackMatch
    recipes: list[SurrogateRecipe]
    config: SNLPConfig
    capped: str = ""

    def describe(self) -> str:
        """The log line's account of the rewrite."""
        kinds = "/".join(sorted({r.kind for r in self.recipes}))
        return f"{self.match.describe()}; surrogate {kinds}; {self.config}{self.capped}"


def cap_iters(config: SNLPConfig, num_layers: int) -> tuple[SNLPConfig, str]:
    """config with iters capped at `solver.useful_iters` for a stack of num_layers (more would change
    nothing), and what the log line says about it ("" when nothing was capped)."""
    useful = useful_iters(num_layers, config)
    if config.iters <= useful:
        return config, ""
    why = "where the largest block reaches its fixed point: more change nothing"
    return config.replace(iters=useful), f"; iters={config.iters} capped at {useful} ({why})"


def stack_config(config: SNLPConfig, excluded: int, num_layers: int) -> SNLPConfig:
    """`config` as it applies to a stack of `num_layers` after `excluded` leading layers (which count toward
    n_seq); ValueError when it does not fit the stack."""
    config = config.replace(n_seq=max(0, config.n_seq - excluded))
    config.check_depth(num_layers)
    return config


def analyse(gm: GraphModule, config: SNLPConfig) -> StackPlan:
    """Detect the stack and read its surrogates; NotAStack when unsafe, ValueError when misconfigured."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if merge_repeated_views(gm.graph):  # a view taken again after a write reads the write: one node
        gm.recompile()
    match = detect_layer_stack(gm)
    if reason is not None and getattr(reason, "graph_break", False):
        raise NotAStack("a graph break ends this graph, so the layer stack may be split across graphs")
    if any(n.op == "placeholder" and "resume_in" in n.name for n in gm.graph.nodes):
        raise NotAStack("this graph resumes after a graph break, so the layer stack may be split across graphs")
    config = stack_config(config, len(match.excluded), len(match.layers))
    unpinned = sorted(set(match.taps) - pinned_states(len(match.layers), config))
    if unpinned:
        indices = [match.layers[p].module_index for p in unpinned]
        raise NotAStack(
            f"the states after layers {indices} of {match.container} are read outside the stack, and with "
            f"fuse={config.fuse} they lie inside a fused super-layer, where the solve has no state of its own"
        )
    recipes = [choose_recipe(match.layers[m[0]], config.surrogate) for m in match.groups]
    config, capped = cap_iters(config, len(match.layers))
    return StackPlan(match, recipes, config, capped)
