"""What decoding needs of a model and of its KV cache: two protocols, met by duck typing.

Decoding drives a model only through `model(idx [B, T], kv_cache=cache) -> logits [B, T, vocab]`,
which appends the K/V of the T tokens to `cache` (and its `check`s are the model's own), and
through the members below; it never reads or writes the cache's tensors. Neither protocol needs
to be inherited from: `snlp_compile.models` meets them without importing this module. A Hugging
Face causal LM is driven through its decoder (hf_decoder.py), which meets them over the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from torch import nn

from .hf_decoder import hf_decoder, is_hf_causal_lm


class KVCache(Protocol):
    """A model's KV cache as decoding drives it (`snlp_compile.models.StaticKVCache` is one)."""

    @property
    def batch_size(self) -> int:
        """The batch size of every forward that uses the cache."""
        ...

    @property
    def max_seq_len(self) -> int:
        """The number of positions the cache holds."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the cache's tensors live."""
        ...

    @property
    def geometry(self) -> Mapping[str, int]:
        """What ties the cache to one model (for example layers, KV heads, head dim): it must equal
        the model's `kv_cache_geometry`."""
        ...

    def reset(self) -> None:
        """Forget every position: the next forward writes from position 0."""
        ...

    def rewind(self, n_positions: int) -> None:
        """Forget the last `n_positions` written, without a host sync: the caller knows that
        0 <= n_positions <= positions filled."""
        ...


class DecodableModel(Protocol):
    """What decoding needs of a model besides `model(idx, kv_cache=cache) -> logits`."""

    @property
    def vocab_size(self) -> int:
        """Token ids are in [0, vocab_size); the logits' last dim."""
        ...

    @property
    def max_seq_len(self) -> int:
        """The longest sequence the model takes, KV cache included."""
        ...

    @property
    def kv_cache_geometry(self) -> Mapping[str, int]:
        """The `geometry` of the caches the model decodes with."""
        ...

    def make_kv_cache(self, batch_size: int, max_seq_len: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        """An empty cache for `batch_size` sequences of up to `max_seq_len` positions."""
        ...


def _missing(obj: object, protocol: type) -> list[str]:
    """The members of `protocol` that `obj` lacks."""
    return [name for name in vars(protocol) if not name.startswith("_") and not hasattr(obj, name)]


def decodable(model: nn.Module) -> DecodableModel:
    """`model`, once it is known to have every member of DecodableModel, or a Hugging Face causal LM's
    decoder (`hf_decoder`); TypeError naming the missing members otherwise."""
    missing = _missing(model, DecodableModel)
    if missing and is_hf_causal_lm(model):
        return hf_decoder(model)
    if missing:
        hint = (
            "; a Hugging Face model that is not a decoder-only causal LM decodes through its own generate(): "
            "compile its forward with torch.compile(model.forward, backend='snlp', ...)"
            if callable(getattr(model, "generate", None))
            else ""
        )
        raise TypeError(
            f"{type(model).__name__} cannot be decoded: it has no {', '.join(missing)} "
            f"(what snlp_compile.decoding.DecodableModel describes: the model's cache factory and limits){hint}"
        )
    return model  # type: ignore[return-value]


def check_cache(cache: object, model: DecodableModel, batch_size: int, needed: int, device: torch.device) -> KVCache:
    """`cache`, once it is known to fit a run of `model` on `batch_size` sequences of `needed`
    positions on `device` (TypeError for a missing KVCache member, ValueError for a misfit)."""
    missing = _missing(cache, KVCache)
    if missing:
        raise TypeError(
            f"kv_cache of type {type(cache).__name__} has no {', '.join(missing)} "
            "(what snlp_compile.decoding.KVCache describes)"
        )
    found, expected = dict(cache.geometry), dict(model.kv_cache_geometry)
    if found != expected:
        raise ValueError(f"kv_cache was built for another model: it has {found}, the model needs {expected}")
    if cache.batch_size != batch_size:
        raise ValueError(f"kv_cache batch size {cache.batch_size} must equal the prompt batch size {batch_size}")
    if cache.max_seq_len < needed:
        raise ValueError(
            f"kv_cache max_seq_len={cache.max_seq_len} must be >= prompt length + max_new_tokens - 1 = {needed}"
        )
    if cache.device != device:
        raise ValueError(f"kv_cache must be on the model's device {device}, got {cache.device}")
    return cache  # type: ignore[return-value]
