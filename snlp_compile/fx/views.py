"""Repeated views of one tensor in one module call merged into one node.

A module that reads a cache through a property (`layer.keys` returning `buffer[i]`) takes a new view
at each read: one before the layer writes the cache in place and one after. Both are the same
memory, so the later read of the write is a read of what the layer wrote; merged into one node, the
stack analysis sees that the reader depends on the write (`detect._make_layer`) rather than taking
the second view for a value computed before the layer.

Invariants: only basic indexing (`operator.getitem` with ints, slices, None and Ellipsis) of a tensor
is merged, the later node replaced by the earlier one, and only where their traced values agree on
storage, sizes, strides, offset and requires_grad (a base moved by `set_` or reshaped in place in
between, or a view taken in another grad mode, is not the same view). Views merge only within one
module call (equal, non-empty `nn_module_stack`), so no merge passes a value from one layer to
another or moves a layer's node out of it.
"""

from __future__ import annotations

import operator
import types

import torch
from torch.fx import Graph, Node
from torch.multiprocessing.reductions import StorageWeakRef

from .values import example_value, freeze

_BASIC_INDEX = (int, slice, types.NoneType, types.EllipsisType)


def _basic_index(index: object) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, _BASIC_INDEX) and not isinstance(i, bool) for i in items)


def _layout(value: torch.Tensor) -> tuple:
    """What makes two views the same memory seen the same way."""
    storage = StorageWeakRef(value.untyped_storage())
    return (
        storage,
        freeze(tuple(value.shape)),
        freeze(value.stride()),
        freeze(value.storage_offset()),
        value.requires_grad,
    )


def merge_repeated_views(graph: Graph) -> int:
    """Replace each basic-indexing view of a tensor node by the first equal one taken in the same module
    call; the number merged."""
    first: dict[tuple, Node] = {}
    merged = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2 or node.kwargs:
            continue
        base, index = node.args
        value, scope = example_value(node), tuple(node.meta.get("nn_module_stack") or {})
        if not isinstance(base, Node) or not isinstance(value, torch.Tensor) or not _basic_index(index) or not scope:
            continue
        key = (base, freeze(index), scope, _layout(value))
        if key not in first:
            first[key] = node
            continue
        node.replace_all_uses_with(first[key])
        graph.erase_node(node)
        merged += 1
    return merged
