"""Derive the Jacobian surrogate of a layer from its skip path in the graph.

The pass interprets a layer's state-dependent nodes abstractly: the state is `I`; adding a
value that does not depend on the state, or a residual branch (anything nonlinear in the
state), keeps the form; multiplying by a scalar that does not depend on the state gives a
scaled identity; `M @ h` with a square state-independent M over the stream axis is stream
mixing (HCN). Invariant: the recipe only refers to the layer's external inputs or constants, so
it can be evaluated once per call from the per-layer inputs, outside the Newton iterations.
"""

from __future__ import annotations

import logging

import torch
from torch.fx import Node

from ...fx import ops
from ...fx.args import flat_args
from ...fx.values import example_value
from ...solver.recipe import SurrogateRecipe
from .stack import Layer

logger = logging.getLogger("snlp_compile")

_ADD = ops.ADD | ops.ADD_
_SUB = ops.SUB | ops.SUB_
_MUL = ops.MUL | ops.MUL_
_DIV = ops.DIV
_MATMUL = ops.MATMUL
_PASS = {
    "contiguous",
    "clone",
    "float",
    "to",
    "type_as",
    torch.clone,
    torch.ops.aten.clone.default,
    torch.ops.aten._to_copy.default,
}

BRANCH = "branch"  # depends on the state through a residual branch: ignored by the surrogate
UNSUPPORTED = "unsupported"  # a skip path the surrogate cannot express (e.g. two skip paths summed)


class SurrogateError(ValueError):
    """surrogate='hc' on a model whose layers have no stream mixing."""


def _operand(value, layer: Layer, forms: dict) -> object:
    if isinstance(value, Node):
        if value in forms:
            return forms[value]
        return ("input", layer.inputs.index(value))
    return ("const", value)


def derive_recipe(layer: Layer) -> SurrogateRecipe | None:
    """The skip path's linear form, or None when it cannot be read off (no skip path)."""
    forms: dict[Node, object] = {}
    for node in layer.nodes:
        operands = []
        for path, value in flat_args(node):
            if (node, path) in layer.state_uses:
                operands.append(())
            elif isinstance(value, Node) or path[0] == "args":
                operands.append(_operand(value, layer, forms))
        linear = [op for op in operands if _is_form(op) or op == UNSUPPORTED]
        target = node.target
        if not linear:
            forms[node] = BRANCH
        elif target in _ADD or target in _SUB:
            if len(linear) != 1 or linear[0] == UNSUPPORTED or (target in _SUB and not _is_form(operands[0])):
                forms[node] = UNSUPPORTED
            else:
                forms[node] = linear[0]
        elif UNSUPPORTED in linear:
            forms[node] = UNSUPPORTED if target in _PASS else BRANCH
        elif target in _MUL or target in _DIV:
            other = [op for op in operands[:2] if not _is_form(op)]
            forms[node] = _scaled(linear[0], other, layer, divide=target in _DIV) if len(linear) == 1 else BRANCH
        elif target in _MATMUL and len(operands) >= 2 and not _is_form(operands[0]) and _is_form(operands[1]):
            forms[node] = _mixed(linear[0], operands[0], layer, node)
        elif target in _PASS:
            forms[node] = linear[0]
        else:
            forms[node] = BRANCH
    out = forms.get(layer.state_out)
    if not _is_form(out):
        return None
    return SurrogateRecipe(tuple(out))


def _is_form(op: object) -> bool:
    return isinstance(op, tuple) and all(isinstance(f, tuple) and f and f[0] in ("scale", "mix") for f in op)


def _scaled(form: tuple, other: list, layer: Layer, divide: bool) -> object:
    if len(other) != 1 or not isinstance(other[0], tuple):
        return BRANCH
    ref = other[0]
    if ref[0] == "const":
        if not isinstance(ref[1], (int, float)):
            return BRANCH
        return (*form, ("scale", ("const", 1.0 / ref[1] if divide else float(ref[1]))))
    value = example_value(layer.inputs[ref[1]])
    if divide or not isinstance(value, torch.Tensor) or value.numel() != 1:
        return BRANCH
    return (*form, ("scale", ref))


def _mixed(form: tuple, matrix: object, layer: Layer, node: Node) -> object:
    if not isinstance(matrix, tuple) or matrix[0] != "input":
        return BRANCH
    value = example_value(layer.inputs[matrix[1]])
    state = example_value(node)
    if (
        isinstance(value, torch.Tensor)
        and value.dim() == 2
        and value.shape[0] == value.shape[1]
        and isinstance(state, torch.Tensor)
        and state.dim() >= 2
        and state.shape[-2] == value.shape[0]
    ):
        return (*form, ("mix", matrix))
    return BRANCH


def choose_recipe(layer: Layer, requested: str) -> SurrogateRecipe:
    """Apply the `surrogate` option to the recipe derived from the graph."""
    if requested == "identity":
        return SurrogateRecipe()
    recipe = derive_recipe(layer)
    if requested == "hc" and (recipe is None or recipe.kind != "mix"):
        raise SurrogateError(
            f"surrogate='hc' needs stream mixing (H_res @ h) on the skip path of layer {layer.module_index}, "
            "and this model has none; use surrogate='auto' or 'identity'"
        )
    if recipe is None:
        logger.warning("snlp: no skip path found in layer %d; using the identity surrogate (IDN)", layer.module_index)
        return SurrogateRecipe()
    return recipe
