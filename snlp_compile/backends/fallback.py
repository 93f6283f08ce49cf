"""The one way every backend falls back, reports a rewrite and raises a configuration error.

Invariants: a graph the passes cannot prove safe runs (or is returned) unmodified with one log
line "snlp: <what happens>: <why>" (`fallback="warn"`) or raises `SNLPFallbackError`
(`fallback="error"`); a wrong configuration raises `SNLPConfigError`, a ValueError. Both are
ShortenTraceback: dynamo re-raises them as they are where it wraps any other exception of a
backend in BackendCompilerFailed (torch/_dynamo/output_graph.py, _call_user_compiler); neither is
a soft failure (Unsupported, UserError), so dynamo does not mark the frame to be skipped afterwards.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from torch._dynamo.exc import ShortenTraceback

from ..config import SNLPConfig
from ..passes.analysis import StackPlan

logger = logging.getLogger("snlp_compile")


class SNLPFallbackError(ShortenTraceback):
    """Raised instead of running a graph unmodified when fallback="error" (a RuntimeError)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, first_useful_frame=None)


class SNLPConfigError(ShortenTraceback, ValueError):
    """A wrong configuration found while compiling: a ValueError that reaches the compiled model's caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message, first_useful_frame=None)


@contextlib.contextmanager
def configuration_errors() -> Iterator[None]:
    """A ValueError inside is a wrong configuration: raised on as SNLPConfigError, which dynamo lets through."""
    try:
        yield
    except ValueError as error:
        raise SNLPConfigError(str(error)) from error


def fall_back(config: SNLPConfig, error: str, warning: str) -> None:
    """Raise SNLPFallbackError("snlp: <error>") with fallback="error"; else log "snlp: <warning>", which
    says what happens instead and why."""
    if config.fallback == "error":
        raise SNLPFallbackError(f"snlp: {error}")
    logger.warning("snlp: %s", warning)


def log_rewrite(plan: StackPlan, lowerings: object) -> None:
    """The one line every backend logs for a rewrite."""
    logger.info("snlp: rewrote %s; lowering: %s", plan.describe(), lowerings)
