"""`find_layer_stack`: what the compiler sees in a model, without compiling it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import SNLPConfig
from ..fx.capture import capture_graphs
from ..fx.equality import same_value
from ..passes.analysis import NotAStack, analyse


@dataclass
class StackReport:
    """The stack found in one dynamo graph, or the reason none was found."""

    found: bool
    reason: str = ""
    container: str = ""
    layers: list[int] = field(default_factory=list)
    excluded: list[int] = field(default_factory=list)
    groups: list[list[int]] = field(default_factory=list)
    shared_inputs: list[str] = field(default_factory=list)
    per_layer_inputs: int = 0
    surrogate: str = ""

    def __str__(self) -> str:
        if not self.found:
            return f"no layer stack: {self.reason}"
        groups = ", ".join("[" + " ".join(str(self.layers[p]) for p in g) + "]" for g in self.groups)
        lines = [
            f"layer stack: {self.container}, layers {self.layers[0]}..{self.layers[-1]} ({len(self.layers)})",
            f"  layer groups: {groups}",
            f"  surrogate: {self.surrogate}",
            f"  shared side inputs: {', '.join(self.shared_inputs) or 'none'}",
            f"  per-layer inputs: {self.per_layer_inputs}",
        ]
        if self.excluded:
            lines.append(f"  run sequentially before the stack: layers {self.excluded}")
        return "\n".join(lines)


def find_layer_stack(
    model: nn.Module, example_inputs: Sequence[Any], config: SNLPConfig | dict | None = None, **kwargs: Any
) -> list[StackReport]:
    """Trace `model(*example_inputs, **kwargs)` with dynamo and report the stack of each graph."""
    config = SNLPConfig.from_options(config)
    reports: list[StackReport] = []

    def report(gm: torch.fx.GraphModule) -> None:
        try:
            plan = analyse(gm, config)
        except NotAStack as why:
            reports.append(StackReport(found=False, reason=str(why)))
            return
        match, first = plan.match, plan.match.layers[0]
        shared = {
            node.name
            for k, node in enumerate(first.inputs)
            if all(k < len(o.inputs) and same_value(o.inputs[k], node) for o in match.layers)
        }
        reports.append(
            StackReport(
                found=True,
                container=match.container,
                layers=[layer.module_index for layer in match.layers],
                excluded=match.excluded,
                groups=match.groups,
                shared_inputs=sorted(shared),
                per_layer_inputs=len(match.layers[0].inputs) - len(shared),
                surrogate="/".join(sorted({r.kind for r in plan.recipes})),
            )
        )

    with torch.no_grad():
        capture_graphs(model, example_inputs, kwargs, report)
    if not reports:
        reason = "dynamo captured no graph (a graph break inside the layer loop makes it run the loop eagerly)"
        reports.append(StackReport(found=False, reason=reason))
    return reports
