"""The structured-Newton math on plain callables: `core` (the solve) and `reference` (what it is checked against)."""

from .core import (
    IDENTITY,
    SURROGATE_KINDS,
    CallableStack,
    LayerStack,
    Surrogate,
    exact_iters,
    pinned_states,
    schedule,
    solve,
    solve_states,
    solve_trace,
    solve_traces,
    split_even,
    useful_iters,
)
from .reference import Diagnostics, StackedModules, diagnose, exact_newton, sequential

__all__ = [
    "IDENTITY",
    "SURROGATE_KINDS",
    "CallableStack",
    "Diagnostics",
    "LayerStack",
    "StackedModules",
    "Surrogate",
    "diagnose",
    "exact_iters",
    "exact_newton",
    "pinned_states",
    "schedule",
    "sequential",
    "solve",
    "solve_states",
    "solve_trace",
    "solve_traces",
    "split_even",
    "useful_iters",
]
