"""`snlp::cache_write_`: a KV-cache write that stays in place when compiled, and its vmap rule.

`snlp_compile/__init__.py` imports this module, so the op is registered whenever any part of the
package is imported (Python imports a package before its subpackages): `models.StaticKVCache`
writes through `torch.ops.snlp.cache_write_` without importing anything outside `models`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


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
