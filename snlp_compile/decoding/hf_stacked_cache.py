"""A drop-in transformers StaticCache whose layers' tensors are views of stacked buffers.

`StackedStaticCache(config=..., max_cache_len=...)` is a `transformers.StaticCache`: the same layer
classes (full, sliding-window), the same update, crop, reset and mask rules. It differs in memory
only: the layers of one kind share one buffer per tensor attribute (keys, values, the count of
positions filled), [n_layers_of_the_kind, ...], and each layer's attribute is a view of its row.
Traced by dynamo, a layer reads `buffer[i]`, so the SNLP rewrite writes all parallel layers' keys
and values into the stacked buffer at once (an input "slice"), with no stacking of per-layer
caches and no copy back on each call, as a plain StaticCache needs.

Invariants: a layer's attribute is always its row of the buffer (an assignment copies into the row;
the counts, made on the CPU, move with the first layer initialised on an accelerator); every layer of
a kind has the same shapes and device (ValueError naming the layer otherwise; no offloading); the
buffers are marked as static addresses, as transformers marks a StaticCache's tensors, so CUDA graphs
keep them.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import transformers
from torch import Tensor

from .hf_decoder import cache_argument

STACKED_ATTRIBUTES = ("keys", "values", "cumulative_length")


class _LayerGroup:
    """The buffers of the layers of one kind: attribute name -> [n_layers, ...] tensor, made at the
    first assignment of that attribute."""

    def __init__(self, kind: str, n_layers: int) -> None:
        self.kind, self.n_layers = kind, n_layers
        self.buffers: dict[str, Tensor] = {}
        self.placed: set[str] = set()  # names whose buffer a layer has put on an accelerator: it stays there

    def row(self, name: str, index: int) -> Tensor | None:
        buffer = self.buffers.get(name)
        return None if buffer is None else buffer[index]

    def assign(self, name: str, index: int, value: Tensor | None) -> None:
        """Copy `value` into row `index` of the buffer of `name` (made, or moved to value's device, first)."""
        buffer = self.buffers.get(name)
        if value is None:
            if buffer is not None:
                raise ValueError(f"StackedStaticCache: {self.kind} layer {index}'s {name} cannot be unset once stored")
            return
        if not isinstance(value, Tensor):
            raise TypeError(f"StackedStaticCache: {self.kind} layer {index}'s {name} must be a tensor, got {value!r}")
        if buffer is None:
            buffer = self._store(name, value.new_zeros((self.n_layers, *value.shape)))
        elif buffer.device != value.device and buffer.device.type == "cpu" and name not in self.placed:
            buffer = self._store(name, buffer.to(value.device))  # a count made on the CPU, moved at initialisation
        elif buffer.device != value.device:
            raise ValueError(
                f"StackedStaticCache: {self.kind} layer {index}'s {name} is on {value.device}, the other {self.kind} "
                f"layers' on {buffer.device}: a stacked cache keeps the layers of a kind on one device (use "
                "transformers.StaticCache for a model spread over devices)"
            )
        if value.device.type != "cpu":
            self.placed.add(name)
        if buffer.shape[1:] != value.shape or buffer.dtype != value.dtype:
            raise ValueError(
                f"StackedStaticCache: {self.kind} layer {index}'s {name} is {tuple(value.shape)} {value.dtype}, the "
                f"other {self.kind} layers' {tuple(buffer.shape[1:])} {buffer.dtype}: a stacked cache needs layers "
                "of one kind to have equal shapes (use transformers.StaticCache for this model)"
            )
        buffer[index].copy_(value)  # a row copied onto itself (as `.to(device)` returns it) stays as it is

    def _store(self, name: str, buffer: Tensor) -> Tensor:
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(buffer)
        self.buffers[name] = buffer
        return buffer


def _stacked_attribute(name: str) -> property:
    def get(layer: Any) -> Tensor | None:
        return layer._stack_group.row(name, layer._stack_index)

    def set_(layer: Any, value: Tensor | None) -> None:
        layer._stack_group.assign(name, layer._stack_index, value)

    return property(get, set_, doc=f"This layer's row of its kind's stacked {name}.")


@functools.cache
def stacked_layer_class(layer_class: type) -> type:
    """`layer_class` (a transformers static cache layer) with its tensors as rows of stacked buffers; an
    instance has `_stack_group` and `_stack_index` set before any of those tensors."""
    namespace: dict[str, Any] = {name: _stacked_attribute(name) for name in STACKED_ATTRIBUTES}
    namespace["__doc__"] = f"{layer_class.__name__} over rows of stacked buffers."
    namespace["_layer_type"] = None  # not registered in transformers' layer-type tables in its base's place
    return type(f"Stacked{layer_class.__name__}", (layer_class,), namespace)


class StackedStaticCache(transformers.StaticCache):
    """A transformers StaticCache whose layers of each kind keep their keys, values and counts as rows of
    one buffer each (see the module docstring). Takes StaticCache's arguments; pass it as the model's
    cache (`cache=` or `past_key_values=`) to its forward or to generate(). Made this way, its buffers
    are allocated by the first forward; `for_model` makes them at once, which a compiled prefill
    needs: made inside a compiled forward, they would be values the first layer passes to the others,
    and the SNLP rewrite would leave that graph unmodified (it logs why)."""

    def __init__(self, config: Any, max_cache_len: int, **kwargs: Any) -> None:
        if kwargs.get("offloading"):
            raise ValueError(
                "StackedStaticCache: offloading moves each layer's tensors on its own, and a layer's tensors here are "
                "rows of one buffer; use transformers.StaticCache(..., offloading=True)"
            )
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        kinds: dict[tuple, list[int]] = {}
        for i, layer in enumerate(self.layers):
            if isinstance(layer, transformers.cache_utils.StaticLayer):
                kinds.setdefault((type(layer), layer.max_cache_len), []).append(i)
        for (layer_class, length), members in kinds.items():
            group = _LayerGroup(f"{layer_class.__name__}({length} positions)", len(members))
            for index, i in enumerate(members):
                old, stacked = self.layers[i], stacked_layer_class(layer_class)
                layer = stacked.__new__(stacked)
                layer._stack_group, layer._stack_index = group, index
                for attribute, value in vars(old).items():  # the stacked ones through their properties
                    setattr(layer, attribute, value)
                self.layers[i] = layer

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_cache_len: int) -> StackedStaticCache:
        """A cache for `model` with its buffers made now: the shapes, dtypes and devices of each layer's keys
        and values are read off one token per row through the model class's own forward (not a compiled
        one set on the instance; no hooks), eagerly, into a StaticCache of one position."""
        cache, probe = cls(model.config, max_cache_len), transformers.StaticCache(model.config, 1)
        ids = torch.zeros(batch_size, 1, dtype=torch.long, device=next(model.parameters()).device)
        with torch.no_grad():
            type(model).forward(model, input_ids=ids, use_cache=True, **{cache_argument(model): probe})
        for mine, seen in zip(cache.layers, probe.layers, strict=True):
            if getattr(seen, "is_initialized", False) and isinstance(mine, transformers.cache_utils.StaticLayer):
                keys, values = (
                    torch.empty(*t.shape[:-2], 0, t.shape[-1], dtype=t.dtype, device=t.device)
                    for t in (seen.keys, seen.values)
                )
                mine.lazy_initialization(keys, values)
        return cache
