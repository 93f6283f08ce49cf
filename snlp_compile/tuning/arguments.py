"""The one place that checks `tune`'s arguments; every error is a ValueError (a TypeError for a
wrong kind of object) that names the argument and what it must be."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..config import SNLPConfig, check_int
from .space import AXES


def _check_tokens(name: str, tokens: Tensor, min_len: int) -> None:
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tune: {name} must be a LongTensor [N, T] of token ids, got {type(tokens).__name__}")
    if tokens.dtype != torch.long:
        raise ValueError(f"tune: {name} must hold token ids as torch.long (a LongTensor), got {tokens.dtype}")
    if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < min_len:
        shape = list(tokens.shape)
        raise ValueError(f"tune: {name} must have shape [N, T] with N >= 1 and T >= {min_len}, got {shape}")
    if tokens.min().item() < 0:
        raise ValueError(f"tune: {name} holds negative token ids (min {tokens.min().item()})")


def _check_space(space: Any) -> None:
    if isinstance(space, Mapping):
        axes = list(space)
        for axis, values in space.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
                raise ValueError(f"tune: space[{axis!r}] must be a non-empty list of values, got {values!r}")
    elif isinstance(space, Sequence) and not isinstance(space, (str, bytes)) and space:
        if not all(isinstance(row, Mapping) for row in space):
            raise ValueError("tune: a space given as a list must hold settings as dicts (axis -> value)")
        axes = [axis for row in space for axis in row]
    else:
        raise ValueError(
            f"tune: space must be a dict axis -> values (their product is searched) or a non-empty list of "
            f"settings (dicts axis -> value), got {space!r}"
        )
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
        raise ValueError(f"tune: unknown space axes {unknown}; the axes are {list(AXES)}")
    settings = [{axis: v} for axis, values in space.items() for v in values] if isinstance(space, Mapping) else space
    for setting in settings:
        try:
            SNLPConfig(**setting)
        except ValueError as error:
            raise ValueError(f"tune: space: {error}") from error


def check_arguments(
    model: Any,
    data: Any,
    budget: Any,
    inputs: Any,
    space: Any,
    base: Any,
    measure: Any,
    warmup: Any,
    reps: Any,
    time_limit: Any = None,
) -> SNLPConfig:
    """Check every argument of `tune` that can be checked before running the model; return the
    base configuration (`base` as an SNLPConfig)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"tune: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget < 0:
        raise ValueError(f"tune: budget must be a finite number >= 0 (a relative tolerance), got {budget!r}")
    if data is not None:
        _check_tokens("data", data, min_len=2)
        if inputs is not None:
            raise ValueError("tune: pass data (scored by loss) or inputs (scored by agreement), not both")
    if inputs is not None:
        _check_tokens("inputs", inputs, min_len=1)
    if space is not None:
        _check_space(space)
    if measure is not None and not all(callable(getattr(measure, name, None)) for name in ("quality", "time_ms")):
        raise TypeError("tune: measure must have methods quality(config) and time_ms(config) (see tuning.Measure)")
    check_int("tune: warmup", warmup, 1)
    check_int("tune: reps", reps, 1)
    if time_limit is not None and (
        isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) or not 0 < time_limit < math.inf
    ):
        raise ValueError(f"tune: time_limit must be None or a finite number of seconds > 0, got {time_limit!r}")
    return SNLPConfig.from_options(base)


def check_token_range(name: str, tokens: Tensor, vocab: int) -> None:
    """Every token id is below the vocabulary size V read off the model's logits."""
    top = tokens.max().item()
    if top >= vocab:
        raise ValueError(f"tune: {name} holds token id {top}, but the model's logits have only {vocab} entries")
