"""snlp-compile: layer-parallel Transformer inference through Structured Newton Layer Parallelism."""

import torch._dynamo

from .backends.dynamo import snlp_backend
from .backends.fallback import SNLPFallbackError
from .backends.fx_transform import snlp_transform
from .backends.onnx_export import export_onnx
from .backends.report import StackReport, find_layer_stack
from .config import SNLPConfig
from .decoding import Generation, generate, snlp_assistant, stream
from .decoding.onnx_generate import onnx_generate
from .distributed import depth_parallel
from .kernels import cache_write as _cache_write  # noqa: F401  (registers snlp::cache_write_, models' cache write)
from .runtime.prepare import prepare
from .training import SNLPRegularizer
from .tuning import TuneResult, tune

# Installed packages register "snlp" through the torch_dynamo_backends entry point; a source
# checkout on PYTHONPATH registers it on import.
if "snlp" not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(snlp_backend, name="snlp")


def __getattr__(name: str) -> object:
    """`StackedStaticCache` (a transformers StaticCache subclass) imports transformers on first use only."""
    if name == "StackedStaticCache":
        from .decoding.hf_stacked_cache import StackedStaticCache

        return StackedStaticCache
    raise AttributeError(f"module 'snlp_compile' has no attribute {name!r}")


__all__ = [
    "Generation",
    "SNLPConfig",
    "SNLPRegularizer",
    "SNLPFallbackError",
    "StackedStaticCache",
    "StackReport",
    "TuneResult",
    "depth_parallel",
    "export_onnx",
    "find_layer_stack",
    "generate",
    "onnx_generate",
    "prepare",
    "snlp_assistant",
    "snlp_backend",
    "snlp_transform",
    "stream",
    "tune",
]
