"""Surrogate recipes: how to compute each layer's J from the layer's own inputs at call time.

Invariant: a recipe refers only to a layer's external inputs or constants, so the stack's
`Surrogate` is computed once per call from the per-layer inputs, outside the Newton iterations;
`stack_surrogate` returns it in stack order, whatever order the layer groups list the layers in.
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
    stream, transposed), an operand ("input", k) (the layer's k-th external input) or ("const", c);
    a mix factor's matrix acts on the streams where `stream` says (`Surrogate.stream`), transposed
    where the graph contracts its first index. No factors: the identity."""

    factors: tuple = ()

    @property
    def kind(self) -> str:
        kinds = {factor[0] for factor in self.factors}
        return "mix" if "mix" in kinds else ("scale" if kinds else "identity")

    @property
    def stream(self) -> tuple[int, int] | None:
        """Where the mix factors' streams are (all agree), None without mixing."""
        return next((factor[2] for factor in self.factors if factor[0] == "mix"), None)


def evaluate_recipe(recipe: SurrogateRecipe, inputs: list[torch.Tensor], n: int) -> torch.Tensor | None:
    """J for n layers from their (stacked, leading axis n, or shared) inputs: None (identity),
    [n] (scale) or [n, M, M] (mix). Scalars commute with the mixing, so they are kept apart."""
    scale, matrix = None, None
    for kind, (source, ref), *mixing in recipe.factors:
        factor = torch.as_tensor(ref) if source == "const" else inputs[ref]
        if kind == "mix" and mixing[1]:  # transposed
            factor = factor.transpose(-1, -2)
        if kind == "scale":
            factor = factor.reshape(-1).expand(n) if factor.numel() == 1 else factor.reshape(n)
            scale = factor if scale is None else factor * scale
        else:
            factor = factor.expand(n, *factor.shape) if factor.dim() == 2 else factor
            matrix = factor if matrix is None else factor @ matrix
    if matrix is None:
        return scale
    return matrix if scale is None else scale.to(matrix.dtype)[:, None, None] * matrix


def stack_surrogate(
    recipes: Sequence[SurrogateRecipe], per_group: Sequence[Sequence[Tensor]], groups: Sequence[Sequence[int]]
) -> Surrogate:
    """The stack's J in stack order from each layer group's recipe and (stacked or shared) inputs;
    `groups[g]` lists the stack positions of group g's layers. Groups of a weaker kind are promoted
    (identity -> scale 1 -> mix with the scale times I)."""
    kinds = {r.kind for r in recipes}
    if kinds == {"identity"}:
        return IDENTITY
    values = [evaluate_recipe(r, list(inputs), len(m)) for r, inputs, m in zip(recipes, per_group, groups, strict=True)]
    ref = next(v for v in values if v is not None)
    stream = next((r.stream for r in recipes if r.stream is not None), (-2, 1))
    if "mix" in kinds:
        kind, size = "mix", next(v.shape[-1] for v, r in zip(values, recipes, strict=True) if r.kind == "mix")
        eye = torch.eye(size, dtype=ref.dtype, device=ref.device)
        values = [
            eye.expand(len(m), size, size) if v is None else (v[:, None, None] * eye if v.dim() == 1 else v)
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
