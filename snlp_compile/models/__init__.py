"""Reference decoder-only Transformers: plain nn.Modules with no knowledge of SNLP."""

from snlp_compile.models.config import GPTConfig
from snlp_compile.models.gpt import GPT
from snlp_compile.models.kv_cache import StaticKVCache
from snlp_compile.models.mhc import MHCGPT

__all__ = ["GPT", "MHCGPT", "GPTConfig", "StaticKVCache"]
