"""Training: the SNLP-aware regulariser, built on the compiler's analysis of any model."""

from .regularizer import SNLPRegularizer, relative_error

__all__ = ["SNLPRegularizer", "relative_error"]
