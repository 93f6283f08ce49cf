"""The torch.compile backend "snlp": analyse the graph, rewrite its layer stack, lower it, hand it to
the inner compiler.

Invariants: fallbacks and configuration errors go through `fallback` (one log line, or
SNLPFallbackError / SNLPConfigError); the rewritten graph goes to the inner compiler whole, so
inductor derives the backward pass from it; the lowering list is chosen once (`lowerings`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._dynamo.exc import RestartAnalysis
from torch.fx import GraphModule

from ..config import SNLPConfig
from ..passes.analysis import NotAStack, analyse
from ..passes.rewrite import rewrite_stack
from .fallback import SNLPFallbackError, configuration_errors, fall_back, log_rewrite
from .lowerings import choose_lowerings

logger = logging.getLogger("snlp_compile")

# torch.compile modes and the SNLPConfig fields they switch on (as inductor's own modes do). torch.compile
# takes a mode or options, not both: with options, these fields are the way to switch them on.
_MODES: dict[str | None, dict[str, bool]] = {
    None: {},
    "default": {},
    "reduce-overhead": {"cudagraphs": True},
    "max-autotune": {"max_autotune": True, "cudagraphs": True},
    "max-autotune-no-cudagraphs": {"max_autotune": True},
}


def inner_compile(gm: GraphModule, example_inputs: Sequence, config: SNLPConfig) -> Callable:
    """Hand a graph to the configured inner compiler."""
    if config.inner == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    patches = {"triton.cudagraphs": config.cudagraphs}
    if config.max_autotune:  # what inductor's own max-autotune modes switch on
        patches.update(max_autotune=True, coordinate_descent_tuning=True)
    return compile_fx(gm, list(example_inputs), config_patches={k: v for k, v in patches.items() if v})


def warn_gemv_without_cudagraphs(config: SNLPConfig, example_inputs: Sequence, differentiable: bool) -> None:
    """Log once per compile when the decode kernels would run on CUDA without CUDA graphs, where each
    of their launches costs Python host time and the step is slower than without them (not when
    gradients flow, where the decode kernels are off)."""
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    if config.gemv and not differentiable and not (config.cudagraphs and config.inner == "inductor") and on_cuda:
        logger.warning(
            "snlp: gemv=True without CUDA graphs launches each decode kernel from Python, which makes a step "
            "slower than gemv=False; pass cudagraphs=True with inner='inductor'"
        )


def is_training(example_inputs: Sequence) -> bool:
    """Gradients will flow: the stacking of weights must be part of the graph."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)


def configure(options: Any, mode: str | None) -> SNLPConfig:
    """The SNLPConfig of torch.compile's `options` or `mode` (it passes one of them at most)."""
    if mode not in _MODES:
        raise ValueError(f"snlp: mode must be one of {sorted(m for m in _MODES if m)}, got {mode!r}")
    return SNLPConfig.from_options(options).replace(**_MODES[mode])


def snlp_backend(gm: GraphModule, example_inputs: Sequence, options: Any = None, mode: str | None = None) -> Callable:
    """torch.compile(model, backend="snlp", options={...}); `options` are SNLPConfig fields."""
    with configuration_errors():
        config = configure(options, mode)
    differentiable = is_training(example_inputs)
    lowerings = choose_lowerings(config, differentiable)
    try:
        with configuration_errors():
            plan = analyse(gm, config)
        new_gm, weights = rewrite_stack(gm, plan, lowerings, list(example_inputs), stack_in_graph=differentiable)
    except NotAStack as why:
        fall_back(config, f"cannot rewrite this graph: {why}", f"running this graph unmodified: {why}")
        return inner_compile(gm, example_inputs, config)
    try:
        compiled = inner_compile(new_gm, example_inputs, plan.config)
    except RestartAnalysis:  # dynamo's own signal (e.g. specialise a float scalar and trace again): not a failure
        raise
    except Exception as error:  # the inner compiler failed on the rewrite: never crash, say why
        why = f"{type(error).__name__}: {error}"
        try:
            fall_back(
                config,
                f"the inner compiler failed on the rewritten graph: {why}",
                f"running this graph unmodified: the inner compiler failed on the rewrite ({why})",
            )
        except SNLPFallbackError as fallback_error:
            raise fallback_error from error
        return inner_compile(gm, example_inputs, config)
    warn_gemv_without_cudagraphs(config, example_inputs, differentiable)
    log_rewrite(plan, lowerings)

    def run(*args: Any) -> Any:
        weights.refresh(args)
        return compiled(*args)

    return run
