"""The torch.compile backend "snlp": detect the layer stack, rewrite it, hand it to inductor.

Invariants: a graph the passes cannot prove safe runs unmodified (`fallback="warn"`, one log
line saying why) or raises `SNLPFallbackError` (`fallback="error"`); a wrong configuration
(bad option, n_seq too deep, surrogate="hc" without mixing) always raises ValueError. Both reach
the caller of the compiled model as these types (dynamo wraps any other exception of a backend in
BackendCompilerFailed), and neither makes dynamo skip the frame for later compiles. The rewritten
graph goes to the inner compiler whole, so inductor derives the backward pass from it; `iters` is
capped where the schedule shows that more iterations change nothing (the log line says so).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch._dynamo.exc import RestartAnalysis, ShortenTraceback
from torch.fx import GraphModule

from ..config import SNLPConfig
from ..passes.detect import LayerStackMatch, NotAStack, detect_layer_stack
from ..passes.float32_logits import fuse_float32_logits
from ..passes.rewrite import rewrite_stack
from ..passes.surrogate import SurrogateRecipe, choose_recipe
from ..solver import useful_iters

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


# Dynamo re-raises a backend's ShortenTraceback as is, where it wraps any other exception in
# BackendCompilerFailed (torch/_dynamo/output_graph.py, _call_user_compiler); it is no soft failure
# (Unsupported, UserError), so dynamo does not mark the frame to be skipped afterwards.
class SNLPFallbackError(ShortenTraceback):
    """Raised instead of running a graph unmodified when fallback="error" (a RuntimeError)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, first_useful_frame=None)


class SNLPConfigError(ShortenTraceback, ValueError):
    """A wrong configuration found while compiling: a ValueError that reaches the compiled model's caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message, first_useful_frame=None)


def inner_compile(gm: GraphModule, example_inputs: Sequence, config: SNLPConfig) -> Callable:
    """Hand a graph to the configured inner compiler."""
    if config.inner == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    patches = {"triton.cudagraphs": config.cudagraphs}
    if config.max_autotune:  # what inductor's own max-autotune modes switch on
        patches.update(max_autotune=True, coordinate_descent_tuning=True)
    return compile_fx(gm, list(example_inputs), config_patches={k: v for k, v in patches.items() if v})


def warn_gemv_without_cudagraphs(config: SNLPConfig, example_inputs: Sequence, training: bool) -> None:
    """Log once per compile when the decode kernels would run on CUDA without CUDA graphs, where each
    of their launches costs Python host time and the step is slower than without them (not when
    training, where gemv is off)."""
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    if config.gemv and not training and not (config.cudagraphs and config.inner == "inductor") and on_cuda:
        logger.warning(
            "snlp: gemv=True without CUDA graphs launches each decode kernel from Python, which makes a step "
            "slower than gemv=False; pass cudagraphs=True with inner='inductor'"
        )


def is_training(example_inputs: Sequence) -> bool:
    """Gradients will flow: the stacking of weights must be part of the graph."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)


def analyse(gm: GraphModule, config: SNLPConfig) -> tuple[LayerStackMatch, list[SurrogateRecipe], SNLPConfig]:
    """Detect the stack and read its surrogates; NotAStack when unsafe, ValueError when misconfigured.

    Leading layers the detector leaves out of the stack run sequentially anyway, so they count
    towards n_seq: the returned config is the one to apply to the detected stack."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    match = detect_layer_stack(gm)
    if reason is not None and getattr(reason, "graph_break", False):
        raise NotAStack("a graph break ends this graph, so the layer stack may be split across graphs")
    if any(n.op == "placeholder" and "resume_in" in n.name for n in gm.graph.nodes):
        raise NotAStack("this graph resumes after a graph break, so the layer stack may be split across graphs")
    config = config.replace(n_seq=max(0, config.n_seq - len(match.excluded)))
    config.check_depth(len(match.layers))
    recipes = [choose_recipe(match.layers[m[0]], config.surrogate) for m in match.groups]
    return match, recipes, config


@contextlib.contextmanager
def configuration_errors() -> Iterator[None]:
    """A ValueError inside is a wrong configuration: raised on as SNLPConfigError, which dynamo lets through."""
    try:
        yield
    except ValueError as error:
        raise SNLPConfigError(str(error)) from error


def configure(options: Any, mode: str | None) -> SNLPConfig:
    """The SNLPConfig of torch.compile's `options` or `mode` (it passes one of them at most)."""
    if mode not in _MODES:
        raise ValueError(f"snlp: mode must be one of {sorted(m for m in _MODES if m)}, got {mode!r}")
    return SNLPConfig.from_options(options).replace(**_MODES[mode])


def cap_iters(config: SNLPConfig, num_layers: int) -> tuple[SNLPConfig, str]:
    """config with iters capped at `solver.useful_iters` for a stack of num_layers (more would change
    nothing), and what the log line says about it ("" when nothing was capped)."""
    useful = useful_iters(num_layers, config)
    if config.iters <= useful:
        return config, ""
    why = "where the largest block reaches its fixed point: more change nothing"
    return config.replace(iters=useful), f"; iters={config.iters} capped at {useful} ({why})"


def snlp_backend(gm: GraphModule, example_inputs: Sequence, options: Any = None, mode: str | None = None) -> Callable:
    """torch.compile(model, backend="snlp", options={...}); `options` are SNLPConfig fields."""
    with configuration_errors():
        config = configure(options, mode)
    try:
        with configuration_errors():
            match, recipes, config = analyse(gm, config)
        config, capped = cap_iters(config, len(match.layers))
        training = is_training(example_inputs)
        new_gm, weights = rewrite_stack(gm, match, recipes, config, list(example_inputs), training)
        if not training and fuse_float32_logits(new_gm.graph):
            new_gm.recompile()
    except NotAStack as why:
        if config.fallback == "error":
            raise SNLPFallbackError(f"snlp: cannot rewrite this graph: {why}") from None
        logger.warning("snlp: running this graph unmodified: %s", why)
        return inner_compile(gm, example_inputs, config)
    try:
        compiled = inner_compile(new_gm, example_inputs, config)
    except RestartAnalysis:  # dynamo's own signal (e.g. specialise a float scalar and trace again): not a failure
        raise
    except Exception as error:  # the inner compiler failed on the rewrite: never crash, say why
        why = f"{type(error).__name__}: {error}"
        if config.fallback == "error":
            raise SNLPFallbackError(f"snlp: the inner compiler failed on the rewritten graph: {why}") from error
        logger.warning("snlp: running this graph unmodified: the inner compiler failed on the rewrite (%s)", why)
        return inner_compile(gm, example_inputs, config)
    warn_gemv_without_cudagraphs(config, example_inputs, training)
    kinds = "/".join(sorted({r.kind for r in recipes}))
    logger.info("snlp: rewrote %s; surrogate %s; %s%s", match.describe(), kinds, config, capped)

    def run(*args: Any) -> Any:
        weights.refresh(args)
        return compiled(*args)

    return run
