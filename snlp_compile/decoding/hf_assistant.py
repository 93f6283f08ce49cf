"""`snlp_assistant`: the SNLP drafter for Hugging Face assisted generation.

`model.generate(ids, assistant_model=snlp_assistant(model, {"iters": 1}))` is lossless speculative
decoding through Hugging Face's own loop: the assistant drafts with the SNLP solve of the model's
own weights, the model verifies with HF's acceptance rule, so greedy output equals the model's
and sampled output follows its distribution.

Invariants: the assistant is a shallow copy of the model (the same modules, parameters and
buffers: no weight is copied or changed) with a generation config of its own, which HF's
assisted loop adjusts; only its forward is compiled (backend "snlp", `dynamic=True`, since the
draft cache's length changes every round). The model itself is left as it was.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from ..config import SNLPConfig


def snlp_assistant(model: nn.Module, options: SNLPConfig | dict[str, Any] | None = None) -> nn.Module:
    """A Hugging Face assistant model drafting with the SNLP solve of `model`'s weights (`options`: the
    SNLPConfig fields of the drafter, validated here; e.g. {"iters": 1})."""
    if not (isinstance(model, nn.Module) and callable(getattr(model, "generate", None))):
        raise TypeError(
            f"snlp_assistant takes a Hugging Face generation model (an nn.Module with generate()), got "
            f"{type(model).__name__}; for snlp_compile's own models use snlp_compile.generate(..., mode='speculative')"
        )
    config = SNLPConfig.from_options(options)
    assistant = copy.copy(model)
    assistant.generation_config = copy.deepcopy(model.generation_config)
    forward = type(model).forward.__get__(assistant)
    assistant.forward = torch.compile(forward, backend="snlp", options=dataclasses.asdict(config), dynamic=True)
    return assistant
