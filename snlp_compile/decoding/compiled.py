"""The model's forward compiled for decoding, once per (model, config), without keeping the model alive.

Each compile gets a `fresh_function` copy of `_forward`: its own dynamo cache and recompile
budget, so the graphs of different models and configs never push each other into eager fallbacks.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..backends.dynamo import snlp_backend
from ..config import SNLPConfig
from ..fresh_code import fresh_function
from .cache import KVCache

logger = logging.getLogger("snlp_compile")

Forward = Callable[[Tensor, KVCache], Tensor]

_COMPILED: weakref.WeakKeyDictionary[Callable[..., Tensor], dict[Any, Callable]] = weakref.WeakKeyDictionary()


def eager_forward(model: Callable[..., Tensor], idx: Tensor, kv_cache: KVCache) -> Tensor:
    """`model(idx, kv_cache=kv_cache)`: the function compiled, with the model an argument, so that
    the compile cache does not own the model."""
    return model(idx, kv_cache=kv_cache)


def compiled_forward(model: Callable[..., Tensor], config: SNLPConfig | None, cudagraphs: bool = False) -> Forward:
    """`(idx, kv_cache) -> logits` of `model` compiled with the snlp backend (inductor when config is None).

    cudagraphs applies to the sequential (config None) compile only: inductor's "reduce-overhead"
    mode; an SNLP config carries its own. Compiled once per (model, config), or per (model,
    cudagraphs) when config is None, and cached while the model is alive. The snlp callable uses
    static shapes (one graph per new-token count: decode steps, and each prompt length of an snlp
    prefill): kernels specialised to each shape, and a decode step that never recompiles into a
    dynamic one. Past dynamo's recompile limit (`torch._dynamo.config.recompile_limit`, 8 by
    default) new prompt lengths run eagerly and dynamo logs it: pad prompts to a few lengths, or
    use prefill="sequential".
    """
    per_model = _COMPILED.setdefault(model, {})
    key = config if config is not None else ("sequential", cudagraphs)
    if key not in per_model:
        if config is None:
            mode = "reduce-overhead" if cudagraphs else None
            per_model[key] = torch.compile(fresh_function(eager_forward), mode=mode)
        else:
            options = dataclasses.asdict(config)
            per_model[key] = torch.compile(
                fresh_function(eager_forward), backend=snlp_backend, options=options, dynamic=False
            )
        what = config or f"inductor (sequential{', CUDA graphs' if cudagraphs else ''})"
        logger.info("snlp: compiled %s for decoding with %s", type(model).__name__, what)
    compiled = per_model[key]
    return lambda idx, kv_cache: compiled(model, idx, kv_cache)
