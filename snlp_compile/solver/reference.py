"""References for the solve: the sequential stack, stacked modules under vmap, exact Newton with
the true Jacobians, and diagnostics (residual per iteration, per-layer error against sequential).

Invariant: nothing here is on a compiled path; these are what tests and diagnostics compare
`core.solve` with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import SNLPConfig
from .core import IDENTITY, LayerStack, Surrogate, solve_traces


class StackedModules:
    """Structurally identical modules evaluated together: their parameters and buffers are stacked
    once (`torch.func.stack_module_state`) and one module's forward runs under `vmap` through
    `functional_call`. `side_inputs` are passed to every layer after the state."""

    def __init__(self, modules: Sequence[nn.Module], side_inputs: Sequence = (), surrogate: Surrogate = IDENTITY):
        self.modules = list(modules)
        self.side_inputs = tuple(side_inputs)
        self.surrogate = surrogate
        self.params, self.buffers = torch.func.stack_module_state(self.modules)
        self._template = self.modules[0]

    def __len__(self) -> int:
        return len(self.modules)

    def layer(self, index: int, h: Tensor) -> Tensor:
        return self.modules[index](h, *self.side_inputs)

    def layers(self, start: int, hs: Tensor) -> Tensor:
        end = start + hs.shape[0]
        params = {k: v[start:end] for k, v in self.params.items()}
        buffers = {k: v[start:end] for k, v in self.buffers.items()}

        def one(p: dict, b: dict, h: Tensor) -> Tensor:
            return torch.func.functional_call(self._template, (p, b), (h, *self.side_inputs))

        return torch.vmap(one)(params, buffers, hs)


def sequential(stack: LayerStack, h0: Tensor) -> Tensor:
    """The reference: h_l = f_l(h_{l-1}) one layer after another."""
    h = h0
    for i in range(len(stack)):
        h = stack.layer(i, h)
    return h


def exact_newton(stack: LayerStack, h0: Tensor, iters: int) -> Tensor:
    """Newton with the true Jacobians (torch.func.jvp), all layers in one block, init h0.

    The reference that shows why the surrogate matters: converges in one iteration on affine
    layers, and in len(stack) iterations on any layers. Not a fast path.
    """
    n = len(stack)
    inputs = [h0] * n
    out = h0
    for _ in range(iters):
        new = [h0]
        for i in range(n):
            value, tangent = torch.func.jvp(lambda h, i=i: stack.layer(i, h), (inputs[i],), (new[i] - inputs[i],))
            new.append(value + tangent)
        inputs, out = new[:-1], new[-1]
    return out


def _relative(a: Tensor, b: Tensor) -> float:
    return (torch.linalg.vector_norm((a - b).float()) / torch.linalg.vector_norm(b.float()).clamp_min(1e-30)).item()


@dataclass
class Diagnostics:
    """residual[k-1]: relative residual ||h_b - f_b..f_{a+1}(h_a)|| / ||h|| of the trace after k
    iterations, k = 1..config.iters; layer_error[l]: relative error against sequential
    after config.iters iterations at each layer the trace pins down."""

    residual: list[float]
    layer_error: dict[int, float]


@torch.no_grad()
def diagnose(stack: LayerStack, h0: Tensor, config: SNLPConfig) -> Diagnostics:
    """Residual per iteration and per-layer error against the sequential trace."""
    reference, h = {}, h0
    for i in range(len(stack)):
        h = stack.layer(i, h)
        reference[i] = h
    residual, traces = [], solve_traces(stack, h0, config, range(1, config.iters + 1))
    for k in range(1, config.iters + 1):
        trace = traces[k]
        previous, previous_index, num, den = h0, -1, 0.0, 0.0
        for index in sorted(trace):
            value = previous
            for j in range(previous_index + 1, index + 1):
                value = stack.layer(j, value)
            num += torch.linalg.vector_norm((trace[index] - value).float()).item() ** 2
            den += torch.linalg.vector_norm(trace[index].float()).item() ** 2
            previous, previous_index = trace[index], index
        residual.append(math.sqrt(num / max(den, 1e-30)))
    layer_error = {i: _relative(v, reference[i]) for i, v in trace.items()}
    return Diagnostics(residual=residual, layer_error=layer_error)
