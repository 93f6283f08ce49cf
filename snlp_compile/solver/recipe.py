"""Surrogate recipes: how to compute each layer's J from the layer's own inputs at call time.

Invariant: a static recipe refers only to a layer's external inputs or constants, so the stack's
`Surrogate` is computed once per call from the per-layer inputs, outside the Newton iterations; a
dynamic one (`dynamic_nodes`) also refers to values the layer computes from its state, which the
layer returns at each evaluation, so its J is computed after each evaluation, at the current iterate.
`stack_surrogate` returns J in stack order, whatever order the layer groups list the layers in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .core import IDENTITY, Surrogate


@dataclass(frozen=True)
class SurrogateRecipe:
    """J = product of factors, applied in order; a factor is ("scale", operand) or ("mix", operand,
    stream, transposed, rank), an operand ("input", k) (the layer's k-th external input), ("node", i)
    (the value of the layer's i-th node, computed from its state) or ("const", c); a mix factor's
    matrix (of `rank` dims: [M, M], or [..., M, M] per batch element or token) acts on the streams
    where `stream` says (`Surrogate.stream`), transposed where the graph contracts its first index.
    No factors: the identity."""

    factors: tuple = ()

    @property
    def kind(self) -> str:
        kinds = {factor[0] for factor in self.factors}
        return "mix" if "mix" in kinds else ("scale" if kinds else "identity")

    @property
    def dynamic_nodes(self) -> tuple[int, ...]:
        """The layer nodes (indices in `Layer.nodes`) whose values J needs at each evaluation, in order."""
        return tuple(ref for _, (source, ref), *_ in self.factors if source == "node")

    def static(self) -> SurrogateRecipe:
        """The recipe without its dynamic factors (J between evaluations unknown: those taken as I)."""
        return SurrogateRecipe(tuple(f for f in self.factors if f[1][0] != "node"))

    @property
    def stream(self) -> tuple[int, int] | None:
        """Where the mix factors' streams are (all agree), None without mixing."""
        return next((factor[2] for factor in self.factors if factor[0] == "mix"), None)


def _lifted(matrix: Tensor, dim: int) -> Tensor:
    """[n, ..., M, M] with ones inserted after n up to `dim` dims (for broadcasting batch dims)."""
    return matrix.reshape(matrix.shape[0], *([1] * (dim - matrix.dim())), *matrix.shape[1:])


def evaluate_recipe(
    recipe: SurrogateRecipe, inputs: list[Tensor], n: int, nodes: dict[int, Tensor] | None = None
) -> Tensor | None:
    """J for n layers from their (stacked, leading axis n, or shared) inputs and the stacked values
    [n, ...] of their `dynamic_nodes`: None (identity), [n] (scale) or [n, ..., M, M] (mix). Scalars
    commute with the mixing, so they are kept apart."""
    scale, matrix = None, None
    for kind, (source, ref), *mixing in recipe.factors:
        factor = {"node": nodes, "input": inputs}[source][ref] if source != "const" else torch.as_tensor(ref)
        if kind == "scale":
            factor = factor.reshape(-1).expand(n) if factor.numel() == 1 else factor.reshape(n)
            scale = factor if scale is None else factor * scale
            continue
        _, transposed, rank = mixing
        if transposed:
            factor = factor.transpose(-1, -2)
        if source != "node" and factor.dim() == rank:  # shared by the n layers
            factor = factor.expand(n, *factor.shape)
        if matrix is not None:
            dim = max(factor.dim(), matrix.dim())
            factor, matrix = _lifted(factor, dim), _lifted(matrix, dim)
        matrix = factor if matrix is None else factor @ matrix
    if matrix is None:
        return scale
    return matrix if scale is None else _lifted(scale.to(matrix.dtype), matrix.dim()) * matrix


def stack_surrogate(
    recipes: Sequence[SurrogateRecipe],
    per_group: Sequence[Sequence[Tensor]],
    groups: Sequence[Sequence[int]],
    nodes: Sequence[dict[int, Tensor]] | None = None,
) -> Surrogate:
    """The stack's J in stack order from each layer group's recipe, (stacked or shared) inputs and
    dynamic node values (`evaluate_recipe`); `groups[g]` lists the stack positions of group g's layers.
    Groups of a weaker kind are promoted (identity -> scale 1 -> mix with the scale times I), and
    mixing matrices are broadcast to one shape."""
    kinds = {r.kind for r in recipes}
    if kinds == {"identity"}:
        return IDENTITY
    nodes = nodes or [{}] * len(recipes)
    values = [
        evaluate_recipe(r, list(inputs), len(m), v)
        for r, inputs, m, v in zip(recipes, per_group, groups, nodes, strict=True)
    ]
    ref = next(v for v in values if v is not None)
    stream = next((r.stream for r in recipes if r.stream is not None), (-2, 1))
    if "mix" in kinds:
        kind = "mix"
        mixes = [v for v, r in zip(values, recipes, strict=True) if r.kind == "mix"]
        dim = max(v.dim() for v in mixes)
        shape = torch.broadcast_shapes(*(_lifted(v, dim).shape[1:] for v in mixes))
        eye = torch.eye(shape[-1], dtype=ref.dtype, device=ref.device)
        values = [
            (eye if v is None else (_lifted(v, dim) if v.dim() > 1 else _lifted(v, dim) * eye)).expand(len(m), *shape)
            for v, m in zip(values, groups, strict=True)
        ]
    else:
        kind = "scale"
        values = [
            torch.ones(len(m), dtype=ref.dtype, device=ref.device) if v is None else v
            for v, m in zip(values, groups, strict=True)
        ]
    order = [p for m in groups for p in m]
    stacked = torch.cat(values)
    if order != list(range(len(order))):
        stacked = torch.empty_like(stacked).index_copy(0, torch.tensor(order, device=stacked.device), stacked)
    return Surrogate(kind, stacked, stream)
