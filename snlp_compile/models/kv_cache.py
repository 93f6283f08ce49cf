"""Static (preallocated, fixed-shape) KV cache for incremental decoding.

It implements the decoding cache protocol (`snlp_compile.decoding.KVCache`) by its shape alone,
without importing it. Its writes go through `torch.ops.snlp.cache_write_` (`index_copy_`
semantics), registered by `snlp_compile.kernels.cache_write`, which `snlp_compile/__init__.py`
imports (so it is registered before this module is): the op stays an in-place write of the new
positions when compiled, where a plain `index_copy_` through a layer's view makes inductor copy
the layer's and the whole cache on every step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from snlp_compile.models.config import GPTConfig

_GEOMETRY_DIMS = {"n_layer": 0, "n_kv_head": 2, "head_dim": 4}  # GPTConfig field -> dim of k and v


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

    @staticmethod
    def geometry_of(config: GPTConfig) -> dict[str, int]:
        """The `geometry` of a cache built for a model of `config`."""
        return {name: getattr(config, name) for name in _GEOMETRY_DIMS}

    @property
    def geometry(self) -> dict[str, int]:
        """What ties the cache to one model: {"n_layer", "n_kv_head", "head_dim"}."""
        return {name: self.k.size(dim) for name, dim in _GEOMETRY_DIMS.items()}

    @property
    def max_seq_len(self) -> int:
        return self.k.size(3)

    @property
    def device(self) -> torch.device:
        return self.k.device

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
        torch.ops.snlp.cache_write_(k_cache, 2, positions, k.to(k_cache.dtype))
        torch.ops.snlp.cache_write_(v_cache, 2, positions, v.to(v_cache.dtype))
        return k_cache, v_cache
