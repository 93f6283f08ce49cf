"""Graphs as dynamo hands them to a backend, for tests of graph passes."""

import torch
from torch.fx import GraphModule


def traced(fn, *inputs: torch.Tensor) -> tuple[GraphModule, list[torch.Tensor]]:
    """fn's graph as dynamo hands it to a backend (nodes carry their traced values, as the passes need)
    and the inputs in the graph's order."""
    graphs = []

    def capture(gm: GraphModule, example_inputs: list) -> GraphModule:
        graphs.append((gm, example_inputs))
        return gm

    torch.compile(fn, backend=capture, fullgraph=True, dynamic=False)(*inputs)
    return graphs[0]
