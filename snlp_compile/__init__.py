"""snlp-compile: layer-parallel Transformer inference through Structured Newton Layer Parallelism."""

from .config import SNLPConfig

__all__ = ["SNLPConfig"]
