"""A decoder with a KV cache as a function of tensors, for the decode-step ONNX export.

`decode_step(model)(input_ids, past_keys, past_values) -> (logits, present_keys, present_values)` runs
the model on a cache that holds the past keys/values and returns that cache's tensors once the model
has added the new tokens': the layout of `snlp_compile.decoding.onnx_generate`. `Prefill(step)(input_ids)`
is the step with no past. A step knows its cache's `geometry` (n_layer, n_kv_head, head_dim), `dtype`,
and the `limits` the files carry as metadata.

Which caches this serves:

- `KVStep`, the model's own cache (`make_kv_cache`, `check_tensor_cache`) when it keeps keys and values
  as tensors `k`, `v` [n_layer, batch, n_kv_head, positions, head_dim] and the filled count as a 0-d
  int64 tensor `pos`, and the model writes the new tokens' keys/values at positions pos .. pos + seq - 1
  and attends over all of `k` with positions >= pos + seq masked (`snlp_compile.models.StaticKVCache`).
  The step fills a shallow copy of such a cache, so no class of `snlp_compile.models` is imported
  here. Its tensors are slices of the stacked keys/values, which the SNLP rewrite writes for all
  parallel layers at once, or, for a graph that is not rewritten, one tensor per layer (`per_layer`),
  stacked once at the end.
- `HFStep`, a Hugging Face decoder whose default cache is a `DynamicCache` of `DynamicLayer`s
  (`check_huggingface_cache`): each layer's past goes into a new DynamicCache, the model appends the
  new tokens' keys/values to it, and the layers' tensors are stacked once at the end.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..decoding.cache import decodable
from ..decoding.hf_decoder import is_hf_causal_lm
from ..decoding.onnx_generate import MAX_SEQ_LEN, VOCAB_SIZE

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
        self.dtype = self.template.k.dtype
        self.limits = {MAX_SEQ_LEN: str(model.max_seq_len), VOCAB_SIZE: str(model.vocab_size)}

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


def _returned_cache(out: Mapping[str, Any]) -> Any:
    """The cache in a Hugging Face model's output: `cache` in recent transformers, `past_key_values` before."""
    return out.get("cache") if "cache" in out else out.get("past_key_values")


def check_huggingface_cache(model: nn.Module) -> Any:
    """`model`'s output for one token, once it is known to hold logits and a DynamicCache of DynamicLayers
    with keys and values [1, n_kv_head, 1, head_dim] (ValueError naming what differs)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    weight = next(model.parameters())
    with torch.no_grad():
        out = model(torch.zeros((1, 1), dtype=torch.long, device=weight.device), use_cache=True)
    cache = _returned_cache(out)
    layers = getattr(cache, "layers", [])
    fits = "logits" in out and type(cache) is DynamicCache and {type(layer) for layer in layers} == {DynamicLayer}
    if fits:
        shapes = {tuple(t.shape) for layer in layers for t in (layer.keys, layer.values)}
        shape = shapes.pop() if len(shapes) == 1 else ()
        fits = len(shape) == 4 and shape[0] == shape[2] == 1  # [batch 1, n_kv_head, 1 position, head_dim]
    if not fits:
        kinds = sorted({type(layer).__name__ for layer in layers})
        raise ValueError(
            f"decode=True exports Hugging Face causal LMs whose default cache is a DynamicCache of DynamicLayers "
            f"(each layer's keys and values [batch, n_kv_head, positions, head_dim], appended to; no sliding "
            f"windows); {type(model).__name__}(ids, use_cache=True) returned "
            f"{'logits and ' if 'logits' in out else 'no logits and '}a {type(cache).__name__} of {kinds}"
        )
    return out


class HFStep(nn.Module):
    """A Hugging Face decoder (`check_huggingface_cache`) on new tokens after a past: the `KVStep` layout,
    with each layer's past keys/values put into a new DynamicCache that the model appends to."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        probe = check_huggingface_cache(model)
        cache = _returned_cache(probe)
        _, n_kv_head, _, head_dim = cache.layers[0].keys.shape
        self.geometry = {"n_layer": len(cache.layers), "n_kv_head": n_kv_head, "head_dim": head_dim}
        self.dtype = cache.layers[0].keys.dtype
        self.limits = {VOCAB_SIZE: str(probe["logits"].size(-1))}
        context = getattr(model.config, "max_position_embeddings", None)
        if context is not None:
            self.limits[MAX_SEQ_LEN] = str(context)
        self.cache_type = type(cache)
        # the cache's keyword: `cache` in recent transformers, `past_key_values` before
        self.cache_keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(self, input_ids: Tensor, past_keys: Tensor, past_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cache = self.cache_type()
        for index, (keys, values) in enumerate(zip(past_keys.unbind(0), past_values.unbind(0), strict=True)):
            cache.update(keys, values, index)
        logits = self.model(input_ids, use_cache=True, **{self.cache_keyword: cache}).logits
        return (
            logits,
            torch.stack([layer.keys for layer in cache.layers]),
            torch.stack([layer.values for layer in cache.layers]),
        )


def decode_step(model: nn.Module, per_layer: bool = False) -> KVStep | HFStep:
    """The decode step of `model`: `HFStep` for a Hugging Face causal LM, else `KVStep` on its own cache (whose
    `per_layer` this is; a DynamicCache holds one tensor per layer anyway)."""
    return HFStep(model) if is_hf_causal_lm(model) else KVStep(model, per_layer)


class Prefill(nn.Module):
    """A decode step with no past: input_ids [B, T] -> (logits, present_keys, present_values [L, B, H, T, D])."""

    def __init__(self, step: KVStep | HFStep) -> None:
        super().__init__()
        self.step = step

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        g = self.step.geometry
        shape = (2, g["n_layer"], input_ids.size(0), g["n_kv_head"], 0, g["head_dim"])
        # two views of one tensor: two equal allocations would be one value to the rewrite, and the
        # layers write keys and values in place
        empty = torch.zeros(shape, dtype=self.step.dtype, device=input_ids.device)
        return self.step(input_ids, empty[0], empty[1])
