"""The program that replaces a stack at call time: the SNLP solve over the layer graphs.

Invariants: `StackProgram(state, per_layer, per_group)` returns what `solver.solve` returns for the
stack whose layers the layer graphs compute (with taps, a tuple: that state first, then the
`solver.solve_states` estimates of the tapped states); the n_seq sequential layers run one at a time from
`per_layer`, the parallel ones as one vmapped call per layer group from `per_group` (inputs stacked
on a leading axis where `batched` says they differ between the group's layers). A layer graph returns
its state, then its side outputs, then the values its group's surrogate recipe needs at each
evaluation (`SurrogateRecipe.dynamic_nodes`); with those, J is taken at each layer's latest evaluation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from ..config import SNLPConfig
from ..solver import Surrogate, solve, solve_states
from ..solver.recipe import SurrogateRecipe, stack_surrogate
from .traced_vmap import TracedVmap


class LayerCalls:
    """The solver's view (`solver.LayerStack`) of a rewritten stack for one call. `per_layer` holds
    the inputs of the layers `solve` runs one at a time (the n_seq sequential ones), `per_group`
    those of each layer group (stacked where they differ between members)."""

    def __init__(self, program: StackProgram, per_layer: tuple, per_group: tuple):
        self.program, self.per_layer, self.per_group = program, per_layer, per_group
        dynamic = any(r.dynamic_nodes for r in program.recipes)
        self.surrogate = LatestSurrogate(self) if dynamic else program.surrogate(per_group)
        self.side_outputs: dict[int, tuple] = {}  # layer -> its side outputs at its latest evaluation
        self.jacobian_values: dict[int, tuple] = {}  # layer -> its recipe's dynamic node values, likewise

    def _state(self, positions: list[int], result: Tensor | tuple, batched: bool) -> Tensor:
        """The state of a layer call's result, keeping its side outputs and dynamic surrogate values
        (one call per layer in `positions`, all of one group; `batched`: the values carry a leading
        layer axis)."""
        if not isinstance(result, tuple):
            return result
        state, *rest = result
        count = len(self.program.recipes[self.program.group_of[positions[0]]].dynamic_nodes)
        cut = len(rest) - count
        for i, p in enumerate(positions):
            values = [value[i] for value in rest] if batched else rest
            self.side_outputs[p], self.jacobian_values[p] = tuple(values[:cut]), tuple(values[cut:])
        return state

    def __len__(self) -> int:
        return len(self.program.group_of)

    def layer(self, index: int, h: Tensor) -> Tensor:
        if index >= len(self.per_layer):
            raise IndexError(f"LayerCalls.layer: only the {len(self.per_layer)} sequential layers run one at a time")
        result = self.program.one_layer_function(self.program.group_of[index])(h, *self.per_layer[index])
        return self._state([index], result, batched=False)

    def layers(self, start: int, hs: Tensor) -> Tensor:
        end = start + hs.shape[0]
        parts = []
        for g, members in enumerate(self.program.groups):
            inside = [i for i, p in enumerate(members) if start <= p < end]
            if not inside:
                continue
            a, b = inside[0], inside[-1] + 1
            local = [members[i] - start for i in range(a, b)]
            xs = hs if local == list(range(hs.shape[0])) else hs[torch.tensor(local, device=hs.device)]
            batched = self.program.batched[g]
            if b - a == 1:  # one layer: called as is (vmap could not write its unbatched in-place inputs)
                args = [x[a] if stacked else x for x, stacked in zip(self.per_group[g], batched, strict=True)]
                result = self.program.one_layer_function(g)(xs[0], *args)
                parts.append((local, self._state([members[a]], result, batched=False).unsqueeze(0)))
                continue
            args = [x[a:b] if stacked else x for x, stacked in zip(self.per_group[g], batched, strict=True)]
            result = self.program.vmapped[g](xs, *args)
            parts.append((local, self._state(members[a:b], result, batched=True)))
        if len(parts) == 1:
            return parts[0][1]
        out = torch.empty_like(hs)
        for local, ys in parts:
            out = out.index_copy(0, torch.tensor(local, device=hs.device), ys)
        return out


class LatestSurrogate:
    """The surrogate of a stack whose J depends on the state: sliced by position, J of those layers
    at their latest evaluation (the solver slices right after evaluating them)."""

    def __init__(self, calls: LayerCalls):
        self.calls = calls

    def __getitem__(self, index: slice) -> Surrogate:
        calls, program = self.calls, self.calls.program
        start, stop, _ = index.indices(len(calls))
        recipes, inputs, positions, nodes = [], [], [], []
        for g, members in enumerate(program.groups):
            inside = [i for i, p in enumerate(members) if start <= p < stop]
            if not inside:
                continue
            stacked = zip(calls.per_group[g], program.batched[g], strict=True)
            recipes.append(program.recipes[g])
            inputs.append([x[torch.tensor(inside, device=x.device)] if on else x for x, on in stacked])
            positions.append([members[i] - start for i in inside])
            values = zip(*(calls.jacobian_values[members[i]] for i in inside), strict=True)  # per node, per layer
            nodes.append(dict(zip(program.recipes[g].dynamic_nodes, map(torch.stack, values), strict=True)))
        return stack_surrogate(recipes, inputs, positions, nodes)


class StackProgram(nn.Module):
    """Runs the SNLP solve over the layer functions of a rewritten stack."""

    def __init__(
        self,
        functions: list[GraphModule],
        one_layer_functions: list[GraphModule] | None,
        groups: list[list[int]],
        batched: list[list[bool]],
        recipes: list[SurrogateRecipe],
        config: SNLPConfig,
        taps: list[int] | None = None,
    ):
        super().__init__()
        self.taps = list(taps or [])  # positions whose states the call returns after the final one
        self.side_outputs: list[int] = [0] * sum(len(g) for g in groups)  # per layer: how many it returns
        self.functions = nn.ModuleList(functions)  # called under vmap for several layers at once
        # for one layer at a time (sequential layers, one-layer blocks) where those take other kernels
        self.one_layer_functions = None if one_layer_functions is None else nn.ModuleList(one_layer_functions)
        self.groups, self.batched, self.recipes, self.config = groups, batched, recipes, config
        # all layers of a group at once; replayed from a trace when the graph runs eagerly
        self.vmapped = [
            TracedVmap(f, (0, *[0 if on else None for on in bs])) for f, bs in zip(functions, batched, strict=True)
        ]
        self.group_of = [0] * sum(len(g) for g in groups)
        for g, members in enumerate(groups):
            for p in members:
                self.group_of[p] = g

    def one_layer_function(self, group: int) -> nn.Module:
        """The layer function of `group` for a call on one layer (not under vmap)."""
        return (self.one_layer_functions or self.functions)[group]

    def surrogate(self, per_group: tuple) -> Surrogate:
        """Per-layer J in stack order, evaluated once per call from the group inputs."""
        return stack_surrogate(self.recipes, per_group, self.groups)

    def forward(self, state: Tensor, per_layer: tuple, per_group: tuple) -> Tensor | tuple[Tensor, ...]:
        """The final state, or (final state, *the tapped states, *each layer's side outputs from its
        last evaluation) where the stack has taps or side outputs."""
        calls = LayerCalls(self, per_layer, per_group)
        if not self.taps and not any(self.side_outputs):
            return solve(calls, state, self.config)
        states = solve_states(calls, state, self.config, [len(calls) - 1, *self.taps])
        sides = [side for p, count in enumerate(self.side_outputs) if count for side in calls.side_outputs[p]]
        return (*states, *sides)
