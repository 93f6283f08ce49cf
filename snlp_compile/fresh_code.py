"""`fresh_function`: a copy of a function with a code object of its own.

Dynamo keeps its compiled graphs, and counts them against its recompile limit, per code object.
Compiling a fresh copy keeps the copy's graphs apart from every other compile of the function, and
dropping the copy drops them, without `torch._dynamo.reset()` (which discards every compiled model
of the process). Dynamo's automatic-dynamic shape memory is keyed by file, line and name, so
copies still share it.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any


def fresh_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` (a plain Python function) with a copy of its code object."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
