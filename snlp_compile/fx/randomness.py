"""Which calls draw random numbers.

Invariant: `random_op` names every call whose aten op is tagged nondeterministic_seeded, except a
dropout-like call that provably draws nothing (training=False, probability 0).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.fx import Node

from .ops import aten_name
from .values import example_value, specialised


def _bound_arguments(node: Node, packet: torch._ops.OpOverloadPacket) -> dict[str, Any]:
    """A call_function node's arguments by name, defaults filled in: by the aten schema of an aten
    target, by the Python signature of a Python one, else by the packet's schema (builtins such as
    torch's SDPA have no Python signature; their arguments follow the aten op's)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        try:
            parameters = inspect.signature(node.target).parameters
        except (TypeError, ValueError):
            schema = getattr(packet, packet.overloads()[0])._schema
        else:
            defaults = {k: p.default for k, p in parameters.items() if p.default is not inspect.Parameter.empty}
            return {**defaults, **dict(zip(parameters, node.args, strict=False)), **node.kwargs}
    defaults = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    return {**defaults, **dict(zip([a.name for a in schema.arguments], node.args, strict=False)), **node.kwargs}


def random_op(node: Node) -> str | None:
    """The name of the random op `node` calls (an aten op tagged nondeterministic_seeded, by its own
    or its aten name: F.dropout, torch.randn_like, Tensor.bernoulli_), None for a deterministic one:
    a dropout-like op called with training=False or with probability 0 (`p`, SDPA's `dropout_p`),
    which returns its input and draws nothing."""
    name = aten_name(node)
    packet = getattr(torch.ops.aten, name, None) if name else None
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return None
    tags = {tag for overload in packet.overloads() for tag in getattr(packet, overload).tags}
    if torch.Tag.nondeterministic_seeded not in tags:
        return None
    bound = _bound_arguments(node, packet) if node.op == "call_function" else {}
    flag = next((bound[k] for k in ("training", "train") if k in bound), None)
    probability = next((bound[k] for k in ("p", "dropout_p") if k in bound), None)
    probability = specialised(example_value(probability) if isinstance(probability, Node) else probability)
    if flag is False or (isinstance(probability, (int, float)) and probability == 0):
        return None
    return name
