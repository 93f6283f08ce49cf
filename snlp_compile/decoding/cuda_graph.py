"""A function of tensors replayed from one CUDA graph, and the per-cache store of such graphs.

Invariants:

- `CapturedCall(fn, inputs, undo)` runs `fn(*inputs)` twice on a side stream of the inputs' device
  (compiling whatever it compiles; an error there propagates), calling `undo()` after each run to
  take back its side effects (a KV cache's advance), then captures one `fn` call on static copies of
  `inputs`. Capturing executes nothing, so a capture that fails (`CaptureFailed`) leaves every
  tensor as the warm-ups left it. Calling it copies new inputs (same shapes and dtypes) into those
  copies and replays the graph: no Python of `fn` runs, no guard is checked. Its outputs are the
  graph's static tensors, overwritten by the next replay: callers copy what they keep.
- A graph reads the memory it was captured on: a KV cache's tensors and the model's parameters.
  `graphs_for(cache, key, model)` keeps one `GraphStore` per cache, for the latest `key` only (a new
  key frees the old graphs), and empties it when the model's `fingerprint` differs from the one
  sealed after its capture: a replay never reads a replaced parameter, nor a stacked copy of
  parameters changed in place (which only a compiled call's Python refreshes).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree


class CaptureFailed(RuntimeError):
    """Capturing a function as a CUDA graph failed (after its warm-ups succeeded)."""


class CapturedCall:
    """`fn(*inputs)` as one CUDA graph on the device of `inputs`' tensors (see the module docstring)."""

    def __init__(self, fn: Callable[..., Any], inputs: tuple, undo: Callable[[], None]) -> None:
        self._device = next(x for x in pytree.tree_leaves(inputs) if isinstance(x, Tensor)).device
        with torch.cuda.device(self._device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn(*inputs)
                    undo()
            torch.cuda.current_stream().wait_stream(side)
            self._inputs = pytree.tree_map_only(Tensor, torch.clone, inputs)
            self._graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(self._graph):
                    self._outputs = fn(*self._inputs)
            except Exception as error:
                raise CaptureFailed(str(error).splitlines()[0] if str(error) else type(error).__name__) from error

    def __call__(self, *inputs: Any) -> Any:
        with torch.cuda.device(self._device):
            for static, new in zip(pytree.tree_leaves(self._inputs), pytree.tree_leaves(inputs), strict=True):
                if isinstance(static, Tensor):
                    static.copy_(new)
            self._graph.replay()
        return self._outputs


def fingerprint(model: nn.Module) -> tuple:
    """What a captured graph assumes of `model`: each parameter's and buffer's address, shape, dtype and
    version. A replay reads values changed in place at those addresses, but not a stacked copy of them
    (refreshed by a compiled call's Python, which a replay skips): hence the versions."""
    tensors = [*model.parameters(), *model.buffers()]
    return tuple((t.data_ptr(), tuple(t.shape), t.dtype, t._version) for t in tensors)


@dataclass
class GraphStore:
    """The graphs of one cache under one key; `fingerprint` is the model's once they are sealed."""

    key: Hashable
    graphs: dict[str, Any] = field(default_factory=dict)
    fingerprint: tuple | None = None

    def seal(self, model: nn.Module) -> None:
        """Record the model as the graphs were captured on it (after any compile moved its parameters)."""
        self.fingerprint = fingerprint(model)


_STORES: weakref.WeakKeyDictionary[object, GraphStore] = weakref.WeakKeyDictionary()


def graphs_for(cache: object, key: Hashable, model: nn.Module) -> GraphStore:
    """The graph store of `cache` for `key`: the kept one, or a new empty one when the key differs or the
    model's fingerprint changed since the store was sealed."""
    store = _STORES.get(cache)
    if store is None or store.key != key or (store.fingerprint is not None and store.fingerprint != fingerprint(model)):
        store = _STORES[cache] = GraphStore(key)
    return store
