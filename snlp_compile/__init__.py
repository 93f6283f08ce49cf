"""snlp-compile: layer-parallel Transformer inference through Structured Newton Layer Parallelism."""

from .backends.dynamo import SNLPFallbackError, snlp_backend
from .config import SNLPConfig
from .prepare import prepare
from .report import StackReport, find_layer_stack

__all__ = ["SNLPConfig", "SNLPFallbackError", "StackReport", "find_layer_stack", "prepare", "snlp_backend"]
