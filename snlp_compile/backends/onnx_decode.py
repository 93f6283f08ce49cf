"""A decoder with a KV cache as a function of tensors, for the decode-step ONNX export.

`KVStep(model)(input_ids, past_keys, past_values) -> (logits, present_keys, present_values)` runs
`model(input_ids, kv_cache=cache)` on a cache that holds the past keys/values followed by empty
slots for the new tokens, and returns that cache's tensors once the model has written them: the
layout of `snlp_compile.decoding.onnx_generate`. `Prefill(model)(input_ids)` is the step with no past.

Which caches this serves (`check_tensor_cache`): the model's own (`make_kv_cache`) when it keeps
keys and values as tensors `k`, `v` [n_layer, batch, n_kv_head, positions, head_dim] and the
filled count as a 0-d int64 tensor `pos`, and the model writes the new tokens' keys/values at
positions pos .. pos + seq - 1 and attends over all of `k` with positions >= pos + seq masked
(`snlp_compile.models.StaticKVCache`). The step fills a shallow copy of such a cache, so no
class of `snlp_compile.models` is imported here. Its tensors are slices of the stacked keys/values,
which the SNLP rewrite writes for all parallel layers at once, or, for a graph that is not
rewritten, one tensor per layer (`per_layer`), stacked once at the end.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..decoding.cache import decodable

_GEOMETRY = ("n_layer", "n_kv_head", "head_dim")  # the cache dims the stacked keys/values have


def check_tensor_cache(model: nn.Module) -> object:
    """An empty cache of `model` (batch 1, one position), once it is known to hold its keys and values as
    the module docstring says (ValueError naming what differs, TypeError for a model that cannot decode)."""
    decoder = decodable(model)
    geometry = dict(decoder.kv_cache_geometry)
    weight = next(model.parameters())
    cache = decoder.make_kv_cache(1, 1, weight.device, weight.dtype)
    if set(geometry) != set(_GEOMETRY):
        raise ValueError(f"decode=True: the model's kv_cache_geometry must have the keys {_GEOMETRY}, got {geometry}")
    expected = (geometry["n_layer"], 1, geometry["n_kv_head"], 1, geometry["head_dim"])
    tensors = [getattr(cache, name, None) for name in ("k", "v", "pos")]
    layout = [None if t is None else (tuple(t.shape), t.dtype) if isinstance(t, Tensor) else type(t) for t in tensors]
    fits = layout == [(expected, weight.dtype), (expected, weight.dtype), ((), torch.int64)]
    if not fits or "batch_size" not in getattr(cache, "__dict__", {}):
        raise ValueError(
            f"decode=True exports models whose KV cache holds tensors k, v [n_layer, batch, n_kv_head, positions, "
            f"head_dim], a 0-d int64 pos and a batch_size attribute (snlp_compile.models.StaticKVCache); "
            f"{type(model).__name__}.make_kv_cache returned a {type(cache).__name__} with (k, v, pos) = {layout}"
        )
    return cache


class KVStep(nn.Module):
    """`model` on new tokens after a past: (input_ids [B, T], past_keys, past_values [L, B, H, P, D]) ->
    (logits [B, T, V], present_keys, present_values [L, B, H, P + T, D]).

    per_layer: the cache holds one tensor per layer, stacked once at the end, instead of layer slices of
    one stacked tensor: an ONNX graph has no in-place writes, so each layer's write into a slice copies
    the whole stack. The SNLP rewrite needs the slices (it writes every parallel layer's at once)."""

    def __init__(self, model: nn.Module, per_layer: bool = False) -> None:
        super().__init__()
        self.model, self.per_layer = model, per_layer
        self.template = check_tensor_cache(model)
        self.geometry: Mapping[str, int] = dict(decodable(model).kv_cache_geometry)

    def forward(self, input_ids: Tensor, past_keys: Tensor, past_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cache = copy.copy(self.template)
        n_new, pad = input_ids.size(1), (0, 0, 0, input_ids.size(1))
        if self.per_layer:
            cache.k, cache.v = ([F.pad(p, pad) for p in past.unbind(0)] for past in (past_keys, past_values))
            length = cache.k[0].size(2)
        else:
            cache.k, cache.v = (F.pad(past, pad) for past in (past_keys, past_values))
            length = cache.k.size(3)
        cache.batch_size = input_ids.size(0)
        # the key length P + T enters the graph here, as the past length P = (P + T) - T: otherwise the first
        # layer to read the cache's size computes it, and every later layer would read a value of that layer
        cache.pos = torch.full((), length, dtype=torch.int64, device=input_ids.device) - n_new
        logits = self.model(input_ids, kv_cache=cache)
        if self.per_layer:
            return logits, torch.stack(cache.k), torch.stack(cache.v)
        return logits, cache.k, cache.v


class Prefill(KVStep):
    """`KVStep` with no past: input_ids [B, T] -> (logits, present_keys, present_values [L, B, H, T, D])."""

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        g = self.geometry
        shape = (2, g["n_layer"], input_ids.size(0), g["n_kv_head"], 0, g["head_dim"])
        # two views of one tensor: two equal allocations would be one value to the rewrite, and the
        # layers write keys and values in place
        empty = torch.zeros(shape, dtype=self.template.k.dtype, device=input_ids.device)
        return super().forward(input_ids, empty[0], empty[1])
