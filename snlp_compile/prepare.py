"""Zero-copy stacking: re-home each layer's parameters as views into one stacked storage.

Invariant: `prepare(model)` changes where parameters live, never their values, names or
objects: `state_dict()` keys and values are identical before and after, optimizers holding the
parameters keep working, and in-place updates of a parameter update the stacked storage the
compiled graph reads (no copy, no refresh).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger("snlp_compile")


def layer_signature(module: nn.Module) -> tuple:
    """Parameter names, shapes, dtypes and devices: equal for layers whose weights can be stacked."""
    return tuple((name, tuple(p.shape), p.dtype, p.device) for name, p in module.named_parameters())


@torch.no_grad()
def prepare(model: nn.Module) -> nn.Module:
    """Stack the parameters of structurally identical layers of every nn.ModuleList in place.

    Returns the same model. Layers are grouped by their parameter names, shapes, dtypes and
    devices; each group's parameter `name` becomes a view `stacked[name][i]` of one tensor.
    """
    stacked_bytes = 0
    for container in model.modules():
        if not isinstance(container, nn.ModuleList) or len(container) < 2:
            continue
        groups: dict[tuple, list[nn.Module]] = {}
        for layer in container:
            groups.setdefault(layer_signature(layer), []).append(layer)
        for signature, layers in groups.items():
            if len(layers) < 2 or not signature:
                continue
            for name, *_ in signature:
                params = [layer.get_parameter(name) for layer in layers]
                storage = torch.stack([p.detach() for p in params])
                for i, p in enumerate(params):
                    p.data = storage[i]
                stacked_bytes += storage.numel() * storage.element_size()
    if stacked_bytes == 0:
        logger.warning("snlp: prepare found no nn.ModuleList of structurally identical layers; nothing stacked")
    else:
        logger.info("snlp: prepare stacked %.1f MiB of layer parameters in place", stacked_bytes / 2**20)
    return model
