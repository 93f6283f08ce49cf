"""Derive the Jacobian surrogate of a layer from its skip path in the graph.

The pass interprets a layer's state-dependent nodes abstractly: the state is `I`; adding a
value that does not depend on the state, or a residual branch (anything nonlinear in the
state), keeps the form; multiplying by a scalar that does not depend on the state gives a
scaled identity; `M @ h` with a square state-independent M over the stream axis is stream
mixing (HCN). Invariant: the recipe refers to the layer's external inputs or constants, so it is
evaluated once per call from the per-layer inputs, outside the Newton iterations; the one exception is
mixing by a matrix the layer computes from its state (dynamic hyper-connections, `H(h) @ h` on a
state [..., M, d]): that factor refers to the layer's node (("node", index in `layer.nodes`)), which
the layer returns at every evaluation, so the solve applies H at the current iterate.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch
from torch.fx import Node

from ...fx import ops
from ...fx.args import flat_args, rebuild
from ...fx.values import example_value, specialised, traced
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
_LAYOUT = {"view", "reshape", "transpose", "permute", "flatten", "unflatten", "movedim", "squeeze", "unsqueeze"}
_LAYOUT |= {torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.unflatten, torch.movedim}
_LAYOUT |= {torch.squeeze, torch.unsqueeze}

BRANCH = "branch"  # depends on the state through a residual branch: ignored by the surrogate
UNSUPPORTED = "unsupported"  # a skip path the surrogate cannot express (e.g. two skip paths summed)


class SurrogateError(ValueError):
    """surrogate='hc' on a model whose layers have no stream mixing."""


@dataclass(frozen=True)
class _Form:
    """A value linear in the state: J applied, then a layout (`probe`: the state's flat element indices
    rearranged as the value's elements are, by views, transposes and reshapes; None: the state's own)."""

    factors: tuple = ()
    probe: torch.Tensor | None = None


def _operand(value, layer: Layer, forms: dict) -> object:
    """A value's form; a node nonlinear in the state as ("node", its index), where it may be a mixing matrix."""
    if isinstance(value, Node):
        if value in forms:
            return ("node", layer.nodes.index(value)) if forms[value] == BRANCH else forms[value]
        return ("input", layer.inputs.index(value))
    return ("const", value)


def derive_recipe(layer: Layer) -> SurrogateRecipe | None:
    """The skip path's linear form, or None when it cannot be read off (no skip path)."""
    state = example_value(layer.state_in)
    forms: dict[Node, object] = {}
    for node in layer.nodes:
        operands = []
        for path, value in flat_args(node):
            if (node, path) in layer.state_uses:
                operands.append(_Form())
            elif isinstance(value, Node) or path[0] == "args":
                operands.append(_operand(value, layer, forms))
        forms[node] = _form_of(node, operands, layer, state)
    out = forms.get(layer.state_out)
    if not isinstance(out, _Form) or out.probe is not None:
        return None
    if len({factor[2] for factor in out.factors if factor[0] == "mix"}) > 1:
        return None  # mixing along two different stream axes: not one structured J
    return SurrogateRecipe(out.factors)


def _form_of(node: Node, operands: list, layer: Layer, state: object) -> object:
    """The form of `node` from its operands' (`_Form`, BRANCH, UNSUPPORTED or a constant / input ref)."""
    linear = [op for op in operands if isinstance(op, _Form) or op == UNSUPPORTED]
    target = node.target
    if not linear:
        return BRANCH
    if target in _ADD or target in _SUB:
        if len(linear) != 1 or linear[0] == UNSUPPORTED or (target in _SUB and not isinstance(operands[0], _Form)):
            return UNSUPPORTED
        return linear[0]
    if UNSUPPORTED in linear:
        return UNSUPPORTED if target in _PASS or target in _LAYOUT else BRANCH
    form = linear[0]
    if target in _MUL or target in _DIV:
        other = [op for op in operands[:2] if not isinstance(op, _Form)]
        return _scaled(form, other, layer, divide=target in _DIV) if len(linear) == 1 else BRANCH
    if target in _MATMUL and len(operands) >= 2 and not isinstance(operands[0], _Form) and operands[1] is form:
        return _mixed(form, operands[0], -2, False, layer, node, state)
    if target in ops.EINSUM and len(linear) == 1:
        return _einsum(node, form, operands, layer, state)
    if target in _PASS:
        return form
    if target in _LAYOUT and operands[0] is form:
        return _relaid(node, form, state)
    return BRANCH


def _scaled(form: _Form, other: list, layer: Layer, divide: bool) -> object:
    if len(other) != 1 or not isinstance(other[0], tuple) or other[0][0] == "node":
        return BRANCH
    ref = other[0]
    if ref[0] == "const":
        if not isinstance(ref[1], (int, float)):
            return BRANCH
        return _Form((*form.factors, ("scale", ("const", 1.0 / ref[1] if divide else float(ref[1])))), form.probe)
    value = example_value(layer.inputs[ref[1]])
    if divide or not isinstance(value, torch.Tensor) or value.numel() != 1:
        return BRANCH
    return _Form((*form.factors, ("scale", ref)), form.probe)


def _probe(form: _Form, state: object) -> torch.Tensor | None:
    """The form's layout as state element indices (the state's own layout where it has none)."""
    if form.probe is not None:
        return form.probe
    shape = [specialised(size) for size in getattr(state, "shape", [None])]
    if not all(isinstance(size, int) for size in shape):
        return None  # symbolic sizes: no layout can be followed
    return torch.arange(math.prod(shape)).view(shape)


def _relaid(node: Node, form: _Form, state: object) -> object:
    """The form after a view, transpose or reshape of it: the same J, the layout rearranged."""
    probe = _probe(form, state)
    if probe is None:
        return UNSUPPORTED
    args = [rebuild(a, lambda _, leaf: specialised(traced(leaf))) for a in node.args[1:]]
    kwargs = {k: rebuild(v, lambda _, leaf: specialised(traced(leaf))) for k, v in node.kwargs.items()}
    try:
        call = getattr(probe, node.target) if isinstance(node.target, str) else functools.partial(node.target, probe)
        moved = call(*args, **kwargs)
    except Exception:  # arguments this probe cannot take (symbolic sizes): not a layout we follow
        return UNSUPPORTED
    own = [specialised(size) for size in state.shape]
    if list(moved.shape) == own and torch.equal(moved.flatten(), torch.arange(moved.numel())):
        return _Form(form.factors, None)  # back in the state's own layout
    return _Form(form.factors, moved)


def _stream_axis(probe: torch.Tensor, axis: int, m: int, state_shape: list[int]) -> tuple[int, int] | None:
    """(dim, inner) of the state (`Surrogate.stream`) that axis `axis` of a value laid out as `probe`
    walks along, None where it walks along no single stream axis of the state."""
    lines = probe.movedim(axis, -1)
    if lines.shape[-1] != m or m < 2:
        return None
    step = int(lines[(0,) * (lines.dim() - 1) + (1,)] - lines[(0,) * lines.dim()])
    if not torch.equal(lines[..., 1:] - lines[..., :-1], torch.full_like(lines[..., 1:], step)):
        return None
    strides = [math.prod(state_shape[d + 1 :]) for d in range(len(state_shape))]
    for d, (stride, size) in enumerate(zip(strides, state_shape, strict=True)):
        if step % stride or not stride <= step < stride * size:
            continue
        inner = step // stride
        if size % (m * inner) == 0 and bool(((lines[..., 0] // stride % size // inner) % m == 0).all()):
            return d - len(state_shape), inner
    return None


def _mixed(form: _Form, matrix: object, axis: int, transposed: bool, layer: Layer, node: Node, state: object) -> object:
    """The form after a square matrix mixes axis `axis` of it (HCN): a state-independent [M, M] along any
    stream axis; [..., M, M] per batch element or token, or computed by the layer from its state
    (dynamic), over a state [..., M, d] in its own layout."""
    if not isinstance(matrix, tuple) or matrix[0] not in ("input", "node"):
        return BRANCH
    dynamic = matrix[0] == "node"
    value = example_value((layer.nodes if dynamic else layer.inputs)[matrix[1]])
    if not (isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[-1] == value.shape[-2]):
        return BRANCH
    m = specialised(value.shape[-1])
    own_layout = form.probe is None and axis == -2 and state.dim() >= 2 and specialised(state.shape[-2]) == m
    if (dynamic or value.dim() > 2) and not (own_layout and _broadcasts(value.shape[:-2], state.shape[:-2])):
        return BRANCH  # a matrix per batch element (or token) mixes only a state [..., M, d] in its own layout
    if own_layout:
        stream = (-2, 1)
    else:
        probe = _probe(form, state)
        shape = [specialised(size) for size in state.shape]
        stream = None if probe is None or not isinstance(m, int) else _stream_axis(probe, axis, m, shape)
        if stream is None:
            return BRANCH
    return _Form((*form.factors, ("mix", matrix, stream, transposed, value.dim())), form.probe)


def _broadcasts(batch: torch.Size, state_batch: torch.Size) -> bool:
    """A matrix's batch dims broadcast against the state's without enlarging it (right-aligned)."""
    if len(batch) > len(state_batch):
        return False
    pairs = zip(reversed(batch), reversed(state_batch), strict=False)
    return all(specialised(a) == 1 or a is b or specialised(a) == specialised(b) for a, b in pairs)


def _einsum(node: Node, form: _Form, operands: list, layer: Layer, state: object) -> object:
    """`torch.einsum("ij,...j...->...i...", H, x)`: H mixes one axis of x, the others pass in place."""
    equation = node.args[0] if node.args and isinstance(node.args[0], str) else None
    values = operands[1:]  # flat: operands passed as a list flatten the same way
    if equation is None or "->" not in equation or "." in equation or len(values) != 2:
        return BRANCH
    inputs, output = equation.replace(" ", "").split("->")
    subscripts = inputs.split(",")
    if len(subscripts) != 2 or values.count(form) != 1:
        return BRANCH
    x_index = values.index(form)
    matrix, (h, x) = values[1 - x_index], (subscripts[1 - x_index], subscripts[x_index])
    if len(h) != 2 or h[0] == h[1]:
        return BRANCH
    contracted = [c for c in h if c in x and c not in output]
    if len(contracted) != 1:
        return BRANCH
    c = contracted[0]
    o = h[1] if h[0] == c else h[0]
    if o in x or x.replace(c, o) != output:
        return BRANCH  # other axes must pass through in place
    return _mixed(form, matrix, x.index(c) - len(x), h[0] == c, layer, node, state)


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
        logger.warning(
            "snlp: no skip path the surrogate can express (identity, scale or stream mixing) in layer %d; "
            "using the identity surrogate (IDN)",
            layer.module_index,
        )
        return SurrogateRecipe()
    return recipe
