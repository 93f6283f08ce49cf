"""Traced values of nodes, and scalars as the shape environment pins them.

Invariant: `freeze` and `value_signature` give equal results for values the rewrite may treat as
one (equal concrete and pinned symbolic scalars), so they can key structure comparisons.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


def specialised(value: Any) -> Any:
    """A symbolic scalar as the Python number the shape environment has pinned it to (a size guarded
    equal to 32, an unspecialised float dynamo had to specialise), else `value` itself; no guard is added."""
    if not isinstance(value, SYMBOLIC):
        return value
    sym = value.node
    known = sym.maybe_as_int() if sym.is_int() else sym.maybe_as_float() if sym.is_float() else sym.maybe_as_bool()
    return value if known is None else known


def freeze(value: Any) -> Any:
    """A hashable form of an argument or traced value; equal symbolic and concrete scalars freeze equal."""
    if isinstance(value, slice):
        return ("slice", freeze(value.start), freeze(value.stop), freeze(value.step))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    value = specialised(value)
    if isinstance(value, SYMBOLIC):
        return ("sym", str(canonical_symbol(value)))
    return value


def canonical_symbol(value: Any) -> Any:
    """The expression of a symbolic scalar after the shape environment's replacements (two sizes
    guarded equal have one expression)."""
    node = value.node
    env = getattr(node, "shape_env", None)
    return env.replace(node.expr) if env is not None else node.expr


def example_value(node: Node) -> Any:
    """The traced value of a node: dynamo's "example_value" or export's "val"."""
    return node.meta.get("example_value", node.meta.get("val"))


def value_signature(node: Node) -> tuple:
    """What a layer's key holds of a traced value: a tensor's shape, dtype and device; a scalar's value
    (a per-layer scalar can only be shared by layers it is equal in, never stacked); else its type."""
    value = example_value(node)
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(freeze(list(value.shape))), value.dtype, value.device.type)
    if isinstance(value, (int, float, *SYMBOLIC)):
        return ("scalar", freeze(value))
    return ("value", type(value).__name__)


def traced(value: object) -> object:
    """The traced value of a node argument; a constant argument as it is."""
    return example_value(value) if isinstance(value, Node) else value


def traced_tensor(value: object) -> torch.Tensor | None:
    """The (fake) tensor a node computes, if it computes one; None for anything else."""
    traced_value = example_value(value) if isinstance(value, Node) else None
    return traced_value if isinstance(traced_value, torch.Tensor) else None
