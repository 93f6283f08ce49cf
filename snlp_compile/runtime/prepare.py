"""Zero-copy stacking: re-home each layer's parameters as views into one stacked storage.

Invariant: `prepare(model)` changes where parameters live, never their values, names or
objects: `state_dict()` keys and values are identical before and after, optimizers holding the
parameters keep working, and in-place updates of a parameter update the stacked storage the
compiled graph reads (no copy, no refresh). The compiled graph moves its stacked parameters the
same way by itself (`snlp_compile.runtime.stacked_weights.move_into`); prepare does it before compiling,
and for every structurally identical group of layers.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .stacked_weights import move_into, stacked_view, why_not_movable

logger = logging.getLogger("snlp_compile")


def layer_signature(module: nn.Module) -> tuple:
    """Parameter names, shapes, dtypes and devices: equal for layers whose weights can be stacked."""
    return tuple((name, tuple(p.shape), p.dtype, p.device) for name, p in module.named_parameters())


@torch.no_grad()
def prepare(model: nn.Module) -> nn.Module:
    """Stack the parameters of structurally identical layers of every nn.ModuleList in place.

    Returns the same model. Layers are grouped by their parameter names, shapes, dtypes and
    devices; each group's parameter `name` becomes the slot `stacked[name][i]` of one tensor,
    unless it is stacked already or may not move (`why_not_movable`: tied, or sharing its storage
    with another tensor; logged with the reason). A parameter's storage is then the whole stack:
    `torch.save` of part of the model (one layer's `state_dict()`) writes every layer's values;
    save `{k: v.clone() for k, v in layer.state_dict().items()}` to write only that layer's.
    """
    stacked_bytes, groups = 0, 0
    for container in model.modules():
        if not isinstance(container, nn.ModuleList) or len(container) < 2:
            continue
        by_signature: dict[tuple, list[nn.Module]] = {}
        for layer in container:
            by_signature.setdefault(layer_signature(layer), []).append(layer)
        for signature, layers in by_signature.items():
            if len(layers) < 2 or not signature:
                continue
            groups += 1
            for name, *_ in signature:
                params = [layer.get_parameter(name) for layer in layers]
                if stacked_view(params) is not None:
                    continue
                why = why_not_movable(params)
                if why is not None:
                    logger.warning("snlp: prepare leaves %s of %d layers as it is: %s", name, len(layers), why)
                    continue
                first = params[0]
                stack = torch.empty((len(params), *first.shape), dtype=first.dtype, device=first.device)
                move_into(params, stack)
                stacked_bytes += stack.nbytes
    if groups == 0:
        logger.warning("snlp: prepare found no nn.ModuleList of structurally identical layers; nothing stacked")
    else:
        logger.info("snlp: prepare stacked %.1f MiB of layer parameters in place", stacked_bytes / 2**20)
    return model
