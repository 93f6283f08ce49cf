"""Hugging Face causal LMs through the decoding protocol (cache.py): `hf_decoder(model)` is a
DecodableModel over the model, whose caches are `StackedStaticCache`s (transformers StaticCaches whose
layers are rows of one buffer per layer kind, so the compiled layers write them in place).

Invariants: a decoder holds its model by a weak reference (it never keeps the model alive) and there
is one per model, so that the forwards compiled for it last across generate() calls; it reads the
model's weights and never changes them. Its forward is `model(input_ids=idx, cache=cache,
use_cache=True).logits` (`past_key_values=cache` where the forward has no `cache` argument, as in
older transformers): the causal mask and the positions come from the cache's own count of the
positions filled, a tensor in each layer, so `rewind` needs no host sync; positions past the count
hold stale keys and values that the mask hides and the next forward overwrites.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from collections.abc import Mapping

import torch
from torch import Tensor, nn

_DECODERS: weakref.WeakKeyDictionary[nn.Module, HFDecoder] = weakref.WeakKeyDictionary()


def is_hf_causal_lm(model: object) -> bool:
    """Whether `model` is a Hugging Face decoder-only generation model (transformers' GenerationMixin)."""
    transformers = sys.modules.get("transformers")  # a transformers model means transformers is imported
    return (
        transformers is not None
        and isinstance(model, nn.Module)
        and isinstance(model, transformers.GenerationMixin)
        and not getattr(model.config, "is_encoder_decoder", False)
    )


def cache_argument(model: nn.Module) -> str:
    """The name under which the model's forward takes its cache: `cache`, or `past_key_values` (older
    transformers)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


class HFStaticCache:
    """A KVCache over a transformers StaticCache (`cache`, what the model's forward takes; a
    StackedStaticCache when the decoder made it)."""

    def __init__(
        self, cache: object, geometry: Mapping[str, int], batch_size: int, max_seq_len: int, device: torch.device
    ):
        self.cache = cache
        self._geometry = dict(geometry)
        self._batch_size, self._max_seq_len, self._device = batch_size, max_seq_len, torch.device(device)

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def max_seq_len(self) -> int:
        return self._max_seq_len

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def geometry(self) -> Mapping[str, int]:
        return self._geometry

    def reset(self) -> None:
        self.cache.reset()

    def rewind(self, n_positions: int) -> None:
        if n_positions:
            self.cache.crop(-n_positions)  # in place on each layer's count: no host sync


class HFDecoder:
    """A DecodableModel over a Hugging Face causal LM (see the module docstring); `hf_decoder` makes them."""

    def __init__(self, model: nn.Module) -> None:
        config = model.config.get_text_config()
        self._model = weakref.ref(model)
        self._cache_argument = cache_argument(model)
        self.name = type(model).__name__
        self.vocab_size: int = config.vocab_size
        self.max_seq_len: int = config.max_position_embeddings
        # a cache is built from the model's own config: tied to the model, not only to its sizes
        self.kv_cache_geometry: Mapping[str, int] = {"layers": config.num_hidden_layers, "model": id(model)}

    def make_kv_cache(
        self, batch_size: int, max_seq_len: int, device: torch.device, dtype: torch.dtype
    ) -> HFStaticCache:
        """An empty StackedStaticCache of `max_seq_len` positions, its buffers made now on the device and in
        the dtype of the model's keys and values, read off one eager token (`device` and `dtype` are the
        model's: decoding passes its weights'). Stacked, the compiled layers write their keys and
        values in place; per-layer tensors would go through per-evaluation copies, whose cost grows with
        `max_seq_len` (equal speed at 640 positions on an H200: benchmarks/RESULTS.md)."""
        from .hf_stacked_cache import StackedStaticCache

        cache = StackedStaticCache.for_model(self._model(), batch_size, max_seq_len)
        return HFStaticCache(cache, self.kv_cache_geometry, batch_size, max_seq_len, device)

    def __call__(self, idx: Tensor, kv_cache: HFStaticCache) -> Tensor:
        return self._model()(input_ids=idx, use_cache=True, **{self._cache_argument: kv_cache.cache}).logits


def hf_decoder(model: nn.Module) -> HFDecoder:
    """The decoder of `model`, a Hugging Face causal LM (one per model, kept while the model lives)."""
    if model not in _DECODERS:
        _DECODERS[model] = HFDecoder(model)
    return _DECODERS[model]
