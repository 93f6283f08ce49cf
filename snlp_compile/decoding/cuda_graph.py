"""A function of tensors replayed from one CUDA graph, and the per-cache store of such graphs.

Invariants:

- `CapturedCall(fn, inputs, undo)` runs `fn(*inputs)` twice on a side stream (compiling whatever it
  compiles), calling `undo()` after each run to take back its side effects (a KV cache's advance),
  then captures one `fn` call on static copies of `inputs`. Calling it copies new inputs (same shapes
  and dtypes) into those copies and replays the graph: no Python of `fn` runs, no guard is checked.
  Its outputs are the graph's static tensors, overwritten by the next replay: callers copy what they
  keep.
- A graph reads the memory it was captured on: a KV cache's tensors and the model's parameters.
  `graphs_for(cache, key, fingerprint)` keeps the graphs of one cache under `key` while the cache
  lives and while `fingerprint` (the parameters' addresses and versions, read by the caller) is
  unchanged; a changed fingerprint drops them, so a replay never reads a replaced parameter.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

_GRAPHS: weakref.WeakKeyDictionary[object, dict[Hashable, tuple[Hashable, dict]]] = weakref.WeakKeyDictionary()


class CapturedCall:
    """`fn(*inputs)` as one CUDA graph (see the module docstring)."""

    def __init__(self, fn: Callable[..., Any], inputs: tuple, undo: Callable[[], None]) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(*inputs)
                undo()
        torch.cuda.current_stream().wait_stream(side)
        self._inputs = pytree.tree_map_only(Tensor, torch.clone, inputs)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._outputs = fn(*self._inputs)

    def __call__(self, *inputs: Any) -> Any:
        for static, new in zip(pytree.tree_leaves(self._inputs), pytree.tree_leaves(inputs), strict=True):
            if isinstance(static, Tensor):
                static.copy_(new)
        self._graph.replay()
        return self._outputs


def fingerprint(model: nn.Module) -> tuple:
    """What a captured graph assumes of `model`: each parameter's and buffer's address, shape, dtype and
    version (values changed in place are read by a replay; replaced tensors would not be)."""
    tensors = [*model.parameters(), *model.buffers()]
    return tuple((t.data_ptr(), tuple(t.shape), t.dtype, t._version) for t in tensors)


def graphs_for(cache: object, key: Hashable, model_fingerprint: Hashable) -> dict:
    """The dict of graphs kept for (`cache`, `key`), emptied when `model_fingerprint` differs from the
    one they were captured under."""
    per_cache = _GRAPHS.setdefault(cache, {})
    seen, graphs = per_cache.get(key, (None, {}))
    if seen != model_fingerprint:
        graphs = {}
        per_cache[key] = (model_fingerprint, graphs)
    return graphs
