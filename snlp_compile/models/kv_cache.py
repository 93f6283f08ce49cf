"""Static (preallocated, fixed-shape) KV cache for incremental decoding, and its in-place write op."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from snlp_compile.models.config import GPTConfig


@torch.library.custom_op("snlp::cache_write_", mutates_args=("cache",))
def cache_write_(cache: Tensor, dim: int, index: Tensor, source: Tensor) -> None:
    """`cache.index_copy_(dim, index, source)` as one opaque op that mutates `cache`.

    Compiled, a layer's write through its view of the whole cache stays an in-place write of the
    new positions (auto-functionalisation keeps the view). Written as `index_copy_` on the view,
    functionalisation copies the layer's whole cache and then the whole cache back into the input,
    and inductor does not undo that: about 15% of a compiled sequential decode step on an H100.
    Under vmap over layers (the snlp rewrite) it stays one in-place write of every layer's new
    positions (`_cache_write_batched`)."""
    cache.index_copy_(dim, index, source)


@cache_write_.register_fake
def _cache_write_fake(cache: Tensor, dim: int, index: Tensor, source: Tensor) -> None:
    return None


def _cache_write_batched(info: Any, in_dims: tuple, cache: Tensor, dim: int, index: Tensor, source: Tensor) -> tuple:
    """vmap rule: a batched cache (one slice per layer) is written by one cache_write_ on the stacked
    cache; an index that differs per slice is written slice by slice."""
    cache_dim, _, index_dim, source_dim = in_dims
    if cache_dim is None:
        raise ValueError("snlp::cache_write_ under vmap writes one cache from every batch entry; batch the cache")
    cache = cache.movedim(cache_dim, 0)
    source = source.expand(info.batch_size, *source.shape) if source_dim is None else source.movedim(source_dim, 0)
    if not -cache.dim() < dim < cache.dim() - 1:  # cache.dim() counts the batch dim
        raise IndexError(f"snlp::cache_write_: dim must be in [{1 - cache.dim()}, {cache.dim() - 2}], got {dim}")
    if index_dim is None:
        cache_write_(cache, dim % (cache.dim() - 1) + 1, index, source)
    else:
        index = index.movedim(index_dim, 0)
        for b in range(info.batch_size):
            cache_write_(cache[b], dim, index[b], source[b])
    return None, None


torch.library.register_vmap("snlp::cache_write_", _cache_write_batched)


class StaticKVCache:
    """Preallocated keys/values ``k``, ``v`` [n_layer, batch, n_kv_head, max_seq_len, head_dim].

    ``pos`` is a 0-d int64 tensor: the number of positions filled. Layers write new keys/values
    in place at their absolute positions and attend over the whole cache (shapes never change);
    the model advances ``pos`` after each forward. Slots at or beyond ``pos`` may hold stale data
    (e.g. after ``rollback``) and are always masked out as future positions. ``k``, ``v`` and ``pos``
    are marked as static addresses, so compiled decode steps that write them in place keep CUDA graphs.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_seq_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        max_seq_len = config.sequence_len if max_seq_len is None else max_seq_len
        if not 1 <= max_seq_len <= config.sequence_len:
            raise ValueError(
                f"max_seq_len must be in [1, config.sequence_len={config.sequence_len}], got {max_seq_len}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        shape = (config.n_layer, batch_size, config.n_kv_head, max_seq_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = torch.zeros((), dtype=torch.int64, device=device)
        for tensor in (self.k, self.v, self.pos):
            torch._dynamo.mark_static_address(tensor)

    @property
    def max_seq_len(self) -> int:
        return self.k.size(3)

    @property
    def remaining(self) -> int:
        """Number of positions still free (reads ``pos``: host sync on GPU)."""
        return self.max_seq_len - int(self.pos)

    def reset(self) -> None:
        """Forget all positions (data is left in place and masked out)."""
        self.pos.zero_()

    def rollback(self, n_positions: int) -> None:
        """Drop the last ``n_positions`` filled positions (checked: reads ``pos``, a host sync on GPU)."""
        filled = int(self.pos)
        if not 0 <= n_positions <= filled:
            raise ValueError(f"rollback n_positions must be in [0, {filled}] (positions filled), got {n_positions}")
        self.rewind(n_positions)

    def rewind(self, n_positions: int) -> None:
        """``rollback`` unchecked, without a host sync: for callers that count the filled positions
        themselves and know 0 <= n_positions <= filled (the speculative decoding loop)."""
        self.pos.sub_(n_positions)

    def check(self, batch_size: int, n_new: int) -> None:
        """Raise ValueError if a forward of [batch_size, n_new] tokens does not fit."""
        if batch_size != self.batch_size:
            raise ValueError(f"input batch size {batch_size} does not match KV cache batch size {self.batch_size}")
        if not torch.compiler.is_compiling() and int(self.pos) + n_new > self.max_seq_len:
            raise ValueError(
                f"KV cache overflow: {int(self.pos)} positions filled + {n_new} new > max_seq_len={self.max_seq_len}"
            )

    def update(self, layer_idx: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v [B, H_kv, T, D] at ``positions`` [T] of layer ``layer_idx``; return its whole cache."""
        k_cache, v_cache = self.k[layer_idx], self.v[layer_idx]
        cache_write_(k_cache, 2, positions, k.to(k_cache.dtype))
        cache_write_(v_cache, 2, positions, v.to(v_cache.dtype))
        return k_cache, v_cache
