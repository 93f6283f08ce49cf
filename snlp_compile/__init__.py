"""snlp-compile: layer-parallel Transformer inference through Structured Newton Layer Parallelism."""

from .backends.dynamo import SNLPFallbackError, snlp_backend
from .config import SNLPConfig

__all__ = ["SNLPConfig", "SNLPFallbackError", "snlp_backend"]
