"""Decoding with a KV cache: sequential, SNLP, and lossless self-speculative decoding.

Written against two protocols (`cache.py`), not against a model class: any model with a cache
factory (`DecodableModel`) whose caches meet `KVCache` decodes. This package imports nothing from
`snlp_compile.models`.
"""

from .cache import DecodableModel, KVCache
from .compiled import compiled_forward
from .generate import Generation, TokenStream, generate, stream
from .hf_assistant import snlp_assistant
from .sampling import Sampler, verify_drafts
from .stats import GenerationStats

__all__ = [
    "DecodableModel",
    "Generation",
    "GenerationStats",
    "KVCache",
    "Sampler",
    "TokenStream",
    "compiled_forward",
    "generate",
    "snlp_assistant",
    "stream",
    "verify_drafts",
]
