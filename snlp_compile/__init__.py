"""snlp-compile: layer-parallel Transformer inference through Structured Newton Layer Parallelism."""

from .backends.dynamo import SNLPFallbackError, snlp_backend
from .config import SNLPConfig
from .generate import Generation, generate, stream
from .prepare import prepare
from .report import StackReport, find_layer_stack

__all__ = [
    "Generation",
    "SNLPConfig",
    "SNLPFallbackError",
    "StackReport",
    "find_layer_stack",
    "generate",
    "prepare",
    "snlp_backend",
    "stream",
]
