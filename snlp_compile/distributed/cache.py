"""LocalKVCache: a static KV cache that holds only the layers one rank evaluates.

Invariant: layer i (its index in the whole model, as its attention passes it to `update`) reads and
writes slot `slots[i]`; everything else is `models.StaticKVCache`, whose geometry's n_layer is the
number of layers held.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from ..models import GPTConfig, StaticKVCache


class LocalKVCache(StaticKVCache):
    """Keys and values [len(layers), batch, n_kv_head, max_seq_len, head_dim] of the given layers."""

    def __init__(
        self,
        config: GPTConfig,
        layers: Sequence[int],
        batch_size: int,
        max_seq_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(dataclasses.replace(config, n_layer=len(layers)), batch_size, max_seq_len, dtype, device)
        self.layers = tuple(layers)
        self.slots = {layer: slot for slot, layer in enumerate(self.layers)}

    def update(self, layer_idx: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        if layer_idx not in self.slots:
            raise IndexError(f"LocalKVCache holds layers {list(self.layers)}, not layer {layer_idx}")
        return super().update(self.slots[layer_idx], k, v, positions)
