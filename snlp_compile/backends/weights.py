"""Stacked weights for inference: built once, reused while the parameters are unchanged.

Invariant: `StackedWeights.get(args)` returns, for each `StackedPlaceholder`, a tensor equal to
`torch.stack([args[i] for i in sources])`. When the sources are already equally spaced views of
one storage (see `snlp_compile.prepare`) it is a view of that storage, with no copy; otherwise a
copy is made once and rebuilt only when a source is replaced or changed in place (version
counter). The user's tensors are never written.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from ..passes.rewrite import StackedPlaceholder

logger = logging.getLogger("snlp_compile")


def stacked_view(tensors: Sequence[Tensor]) -> Tensor | None:
    """A [n, ...] view over the tensors' common storage when they are equally spaced in it."""
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    if any(
        t.untyped_storage().data_ptr() != storage
        or t.shape != first.shape
        or t.stride() != first.stride()
        or t.dtype != first.dtype
        for t in tensors
    ):
        return None
    offsets = [t.storage_offset() for t in tensors]
    step = offsets[1] - offsets[0] if len(offsets) > 1 else first.numel()
    if step <= 0 or offsets != [offsets[0] + i * step for i in range(len(offsets))]:
        return None
    with torch.no_grad():
        return first.as_strided((len(tensors), *first.shape), (step, *first.stride()), offsets[0])


class StackedWeights:
    """Cache of the stacked parameter tensors a rewritten graph takes as extra inputs."""

    def __init__(self, specs: Sequence[StackedPlaceholder]):
        self.specs = list(specs)
        self._keys: list[tuple | None] = [None] * len(self.specs)
        self._values: list[Tensor | None] = [None] * len(self.specs)
        self._sources: list[list[Tensor]] = [[] for _ in self.specs]  # keeps ids in the keys unique
        self._logged = False

    def get(self, args: Sequence[Tensor]) -> list[Tensor]:
        copied = 0
        for i, spec in enumerate(self.specs):
            tensors = [args[j] for j in spec.sources]
            key = tuple((id(t), t._version) for t in tensors)
            if key == self._keys[i]:
                continue
            value = stacked_view(tensors)
            if value is None:
                with torch.no_grad():
                    value = torch.stack(tensors)
                copied += value.numel() * value.element_size()
            self._keys[i], self._values[i], self._sources[i] = key, value, tensors
        if copied and not self._logged:
            self._logged = True
            logger.info(
                "snlp: stacked %.1f MiB of layer weights into a cached copy (snlp_compile.prepare(model) "
                "stacks them in place with no copy)",
                copied / 2**20,
            )
        return self._values
