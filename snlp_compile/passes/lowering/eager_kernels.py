"""Eager-path kernels: for graphs run without inductor (which fuses these ops by itself), RMS norms
under vmap through snlp::rms_norm (one fused kernel, not its decomposition; a one-layer call keeps
torch's, which dispatches faster than a custom op) and rotary embeddings through snlp::rotary
(`rotary.fuse_rotary`). Inference only. Invariant: each replacement computes its node's value.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Graph, Node

from ...fx import ops
from ...kernels import rms_norm as _rms_norm  # noqa: F401  (registers snlp::rms_norm)
from ..rewrite.lowering_list import Lowering, Where
from .rotary import fuse_rotary


def _retarget(node: Node, where: Where) -> tuple[Any, dict[str, Any]] | None:
    if where is Where.BATCHED and node.op == "call_function" and node.target in ops.RMS_NORM:
        return torch.ops.snlp.rms_norm.default, {}
    return None


def _rotary(graph: Graph, where: Where) -> None:
    if where is not Where.OUTSIDE:
        fuse_rotary(graph)


EAGER_KERNELS = Lowering("eager kernels", retarget=_retarget, graph_pass=_rotary, one_layer_differs=True)
