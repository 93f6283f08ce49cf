"""Stacked layer weights for inference: built once, refreshed only when the weights change.

Invariant: after `refresh(args)`, every buffer equals `torch.stack([args[i] for i in sources])`.
When the sources are equally spaced views of one storage (`snlp_compile.prepare`) the buffer is
a view of that storage, with no copy and nothing to refresh; otherwise it is an owned copy made
once and updated in place (same address, so CUDA graphs stay valid) when a source is replaced or
changed in place (version counters). The user's tensors are never written. `refresh` runs before
every call of the compiled graph, so its common case (nothing changed) stays a few C-level passes.
Not seen: `param.data = other` and writes through `param.data`, which PyTorch does not count as
versions (use `param.copy_(...)` under `torch.no_grad()`, or compile again).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import attrgetter, is_, itemgetter

import torch
from torch import Tensor


def stacked_view(tensors: Sequence[Tensor]) -> Tensor | None:
    """A [n, ...] view over the tensors' common storage when they are equally spaced in it."""
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    for t in tensors:
        same_layout = t.shape == first.shape and t.stride() == first.stride() and t.dtype == first.dtype
        if t.untyped_storage().data_ptr() != storage or not same_layout:
            return None
    offsets = [t.storage_offset() for t in tensors]
    step = offsets[1] - offsets[0] if len(offsets) > 1 else first.numel()
    if step <= 0 or offsets != [offsets[0] + i * step for i in range(len(offsets))]:
        return None
    with torch.no_grad():
        return first.detach().as_strided((len(tensors), *first.shape), (step, *first.stride()), offsets[0])


_VERSION = attrgetter("_version")


def _versions(tensors: Sequence[Tensor]) -> tuple[int, ...]:
    return tuple(map(_VERSION, tensors))


def _getter(sources: list[int]) -> Callable[[Sequence[Tensor]], tuple[Tensor, ...]]:
    """args -> the tuple of args[i] for i in sources (itemgetter returns a bare item for one index)."""
    if len(sources) == 1:
        return lambda args: (args[sources[0]],)
    return itemgetter(*sources)


class StackedWeights:
    """The stacked weight buffers of one rewritten graph, keyed by the graph inputs they stack."""

    def __init__(self) -> None:
        self.buffers: list[Tensor] = []
        self._gets: list[Callable[[Sequence[Tensor]], tuple[Tensor, ...]]] = []
        self._stacked: list[tuple[Tensor, ...]] = []  # the tensors each buffer was last made from
        self._versions: list[tuple[int, ...] | None] = []  # their version counters; None for views
        self.copied_bytes = 0  # memory the stacked copies cost (0 after snlp_compile.prepare)

    def add(self, sources: list[int], args: Sequence[Tensor]) -> Tensor:
        """Register a stack of args[i] for i in sources; returns its buffer."""
        get = _getter(list(sources))
        tensors = get(args)
        buffer = stacked_view(tensors)
        versions = None
        if buffer is None:
            with torch.no_grad():
                buffer = torch.stack([t.detach() for t in tensors])
            self.copied_bytes += buffer.numel() * buffer.element_size()
            versions = _versions(tensors)
        self.buffers.append(buffer)
        self._gets.append(get)
        self._stacked.append(tensors)
        self._versions.append(versions)
        return buffer

    def refresh(self, args: Sequence[Tensor]) -> None:
        """Bring every buffer up to date with the current args (cheap when nothing changed).

        A view shares its sources' storage, so only a replaced source matters; a copy is also
        rewritten when a source changed in place."""
        for i, get in enumerate(self._gets):
            tensors = get(args)
            same = all(map(is_, tensors, self._stacked[i]))
            versions = self._versions[i]
            if versions is None:
                if same:
                    continue
                view, buffer = stacked_view(tensors), self.buffers[i]
                if view is None or (view.data_ptr(), view.shape, view.stride()) != (
                    buffer.data_ptr(),
                    buffer.shape,
                    buffer.stride(),
                ):
                    raise RuntimeError(
                        "snlp: weights stacked in place by snlp_compile.prepare were replaced; call "
                        "torch._dynamo.reset() and compile again"
                    )
                self._stacked[i] = tensors
                continue
            current = _versions(tensors)
            if same and current == versions:
                continue
            with torch.no_grad():
                torch.stack([t.detach() for t in tensors], out=self.buffers[i])
            self._stacked[i], self._versions[i] = tensors, current
