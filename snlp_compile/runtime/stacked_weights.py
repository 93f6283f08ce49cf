"""Stacked layer weights for inference: the compiled graph's [n, ...] buffers hold the current weights.

Invariant: after `refresh(args)`, every buffer equals `torch.stack([args[i] for i in sources])`.
A buffer object, its shape, strides and dtype never change (inductor captures the object when it
compiles; CUDA graphs read its address): only its contents, or the storage it views (`Tensor.set_`).
No value of the user's tensors changes, and no memory is written that anything but the buffers and
the sources living in their slots can see (counted with `torch._C._storage_Use_Count`).

A buffer views its sources or is a copy of them:

- Views (the default for parameters): each source is the slot `buffer[j]` of one stacked storage,
  so every in-place write to a source, through `.data` too, reaches the graph with no copy. The
  sources were stacked already (`snlp_compile.prepare`, another compiled graph), or the first call
  moves them there (`move_into`: `p.data = buffer[j]`, logged; values, names, objects, shapes and
  strides unchanged) when they are distinct contiguous nn.Parameters, each the only tensor holding
  its storage, whose size keeps every slot 16-byte aligned (`why_not_movable`).
- A copy (one tensor at two layers, buffers and inputs, a parameter whose storage another tensor
  shares; logged with the reason): owned memory, rewritten in place when a source's version counter
  moves. Not seen: in-place writes through `.data` (or an alias made with it) to a source that is
  not its slot, since they move no version counter; seeing them would take a comparison of every
  value on every call.

A replaced source, by a new object or a new storage under the same object (`p.data = t`,
`model.half().float()`, `load_state_dict(..., assign=True)`, a swapped or tied layer, `prepare`
again), changes an identity or a data pointer and is seen in both modes. The buffer then views the
sources where they are when they are stacked already; else it takes their values into its storage
and moves them there when nothing else holds that storage; else it becomes a copy in new memory,
leaving the old to whoever holds it.

`refresh` runs before every call of the compiled graph: when nothing changed it costs two C-level
passes per buffer (identities, data pointers), three for a copy (version counters).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence, Set
from operator import attrgetter, is_, itemgetter

import torch
from torch import Tensor, nn

logger = logging.getLogger("snlp_compile")

# Bytes inductor assumes a static input aligned to when it was aligned at compile time.
_ALIGNMENT = 16
_VERSION = attrgetter("_version")
_DATA_PTR = Tensor.data_ptr
# Every live buffer: the holders of a stacked storage that may see its slots rewritten.
_BUFFERS: weakref.WeakSet[Tensor] = weakref.WeakSet()


def stacked_view(tensors: Sequence[Tensor]) -> Tensor | None:
    """A [n, ...] tensor over the tensors' common storage when they are equally spaced in it."""
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
    # set_ rather than as_strided: a view would keep a base alias of first, one more holder of the storage
    with torch.no_grad():
        view = torch.empty(0, dtype=first.dtype, device=first.device)
        return view.set_(first.untyped_storage(), offsets[0], (len(tensors), *first.shape), (step, *first.stride()))


def _holders(t: Tensor) -> int:
    """How many tensors (and other owners) hold t's storage, t included."""
    storage = t.untyped_storage()
    return torch._C._storage_Use_Count(storage._cdata) - 1  # less the handle just taken


def why_not_movable(tensors: Sequence[Tensor], in_place: Set[int] = frozenset()) -> str | None:
    """Why `move_into` may not move these tensors (None when it may): moving must change nothing
    anybody can observe through another tensor. `in_place`: ids of those that are their slot already."""
    if len({id(t) for t in tensors}) < len(tensors):
        return "one tensor is stacked at two layers (tied weights)"
    for t in tensors:
        if id(t) in in_place:
            continue
        if type(t) is not nn.Parameter:
            return "they are not all plain parameters (buffers, inputs and tensor subclasses are copied)"
        if not t.is_contiguous() or t.storage_offset() or t.untyped_storage().nbytes() != t.nbytes:
            return "a parameter is not the contiguous whole of its storage"
        if t.nbytes % _ALIGNMENT:
            return f"a parameter's size is not a multiple of {_ALIGNMENT} bytes (its slot would be misaligned)"
        if _holders(t) != 1:
            return "a parameter shares its storage with another tensor"
    return None


@torch.no_grad()
def _write_slots(tensors: Sequence[Tensor], stack: Tensor) -> None:
    """stack[j] = tensors[j], skipping the sources that are their slot already."""
    for t, slot in zip(tensors, stack.unbind(0), strict=True):
        if t.data_ptr() != slot.data_ptr():
            slot.copy_(t)


@torch.no_grad()
def move_into(tensors: Sequence[Tensor], stack: Tensor) -> None:
    """Make each tensors[j] the slot stack[j] (`.data`), with its values: values, objects, shapes
    and strides unchanged. The caller checks `why_not_movable` first."""
    _write_slots(tensors, stack)
    for t, slot in zip(tensors, stack.unbind(0), strict=True):
        if t.data_ptr() != slot.data_ptr():
            t.data = slot


def _buffers_viewing(t: Tensor) -> int:
    """How many buffers (of any StackedWeights) view t's storage."""
    storage = t.untyped_storage().data_ptr()
    return sum(b.untyped_storage().data_ptr() == storage for b in _BUFFERS)


def _getter(sources: list[int]) -> Callable[[Sequence[Tensor]], tuple[Tensor, ...]]:
    """args -> the tuple of args[i] for i in sources (itemgetter returns a bare item for one index)."""
    if len(sources) == 1:
        return lambda args: (args[sources[0]],)
    return itemgetter(*sources)


def _layout(t: Tensor) -> tuple:
    return t.shape, t.stride(), t.dtype, t.device


def _fits(view: Tensor, buffer: Tensor) -> bool:
    """The buffer may view what `view` views: same layout, and aligned as inductor assumes."""
    return _layout(view) == _layout(buffer) and view.data_ptr() % _ALIGNMENT == 0


def _slots_at_home(tensors: Sequence[Tensor], buffer: Tensor) -> set[int]:
    """Identities of the sources that are their own slot of the buffer."""
    step, inner = buffer.stride(0) * buffer.element_size(), buffer.stride()[1:]
    return {
        id(t)
        for j, t in enumerate(tensors)
        if t.data_ptr() == buffer.data_ptr() + j * step and t.stride() == inner and t.dtype == buffer.dtype
    }


class _Stack:
    """One buffer, how to read its sources from the args, and what it was last made from."""

    __slots__ = ("buffer", "get", "ptrs", "tensors", "versions", "why")

    def __init__(
        self, buffer: Tensor, get: Callable[[Sequence[Tensor]], tuple[Tensor, ...]], versions: tuple[int, ...] | None
    ) -> None:
        self.buffer, self.get = buffer, get
        self.tensors: tuple[Tensor, ...] = ()  # empty until the first refresh settles the buffer
        self.ptrs: tuple[int, ...] = ()
        self.versions = versions  # None: views, nothing to copy
        self.why: str | None = None  # why the buffer is a copy


class StackedWeights:
    """The stacked weight buffers of one rewritten graph, keyed by the graph inputs they stack."""

    def __init__(self) -> None:
        self._stacks: list[_Stack] = []

    @property
    def buffers(self) -> list[Tensor]:
        return [s.buffer for s in self._stacks]

    @property
    def copied_bytes(self) -> int:
        """Memory the buffers that are copies cost (0 when every buffer views its sources)."""
        return sum(s.buffer.nbytes for s in self._stacks if s.versions is not None)

    def add(self, sources: list[int], args: Sequence[Tensor]) -> Tensor:
        """Register a stack of args[i] for i in sources; returns its buffer, holding their values.

        The first `refresh` (the first call, once the graph is compiled: the compiler traces the
        sources as they are now) decides between views and a copy, moving the sources if it may."""
        get = _getter(list(sources))
        tensors = get(args)
        buffer = stacked_view(tensors)
        copy = buffer is None or buffer.data_ptr() % _ALIGNMENT
        if copy:
            with torch.no_grad():
                buffer = torch.stack([t.detach() for t in tensors])
        self._stacks.append(_Stack(buffer, get, () if copy else None))
        _BUFFERS.add(buffer)
        return buffer

    def refresh(self, args: Sequence[Tensor]) -> None:
        """Bring every buffer up to date with the current args (a few C-level passes when nothing changed)."""
        for stack in self._stacks:
            tensors = stack.get(args)
            if (
                all(map(is_, tensors, stack.tensors))
                and tuple(map(_DATA_PTR, tensors)) == stack.ptrs
                and (stack.versions is None or tuple(map(_VERSION, tensors)) == stack.versions)
            ):
                continue
            self._restack(stack, tensors)

    @torch.no_grad()
    @torch.inference_mode(False)
    def _restack(self, stack: _Stack, tensors: tuple[Tensor, ...]) -> None:
        """Make stack.buffer equal the stack of `tensors`, as views where possible (module docstring)."""
        buffer = stack.buffer
        view = stacked_view(tensors)
        if view is not None and _fits(view, buffer):
            if view.data_ptr() != buffer.data_ptr():
                buffer.set_(view.untyped_storage(), view.storage_offset(), buffer.shape, buffer.stride())
            why = None
        else:
            at_home = _slots_at_home(tensors, buffer)
            if _holders(buffer) != _buffers_viewing(buffer) + len(at_home):  # seen by others: never write it
                fresh = torch.empty_strided(buffer.shape, buffer.stride(), dtype=buffer.dtype, device=buffer.device)
                buffer.set_(fresh.untyped_storage(), 0, buffer.shape, buffer.stride())
                at_home = set()
            why = why_not_movable(tensors, at_home)
            if why is None:
                if len(at_home) < len(tensors):
                    logger.info(
                        "snlp: moved %d layer parameters of shape %s into one stacked storage (%.2f MiB; values, "
                        "names and objects unchanged): the compiled graph reads them with no copy",
                        len(tensors),
                        tuple(buffer.shape[1:]),
                        buffer.nbytes / 2**20,
                    )
                move_into(tensors, buffer)
            else:
                _write_slots(tensors, buffer)
        if why is not None and why != stack.why:
            logger.info(
                "snlp: the compiled graph reads a copy of %d layer tensors of shape %s (%.2f MiB), in which writes "
                "through .data are not seen: %s",
                len(tensors),
                tuple(buffer.shape[1:]),
                buffer.nbytes / 2**20,
                why,
            )
        stack.tensors, stack.ptrs, stack.why = tensors, tuple(map(_DATA_PTR, tensors)), why
        stack.versions = None if why is None else tuple(map(_VERSION, tensors))
