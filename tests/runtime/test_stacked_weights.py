"""StackedWeights: the buffers always equal the stack of the current sources, and never write
memory that anybody but the buffer and the sources moved into it can see."""

import logging

import torch
from torch import nn

from snlp_compile.runtime.stacked_weights import StackedWeights


def params(n: int, *shape: int) -> list[nn.Parameter]:
    return [nn.Parameter(torch.randn(*shape)) for _ in range(n)]


def assert_stacked(buffer, tensors):
    torch.testing.assert_close(buffer, torch.stack(list(tensors)), rtol=0, atol=0)


def test_a_copied_stack_follows_in_place_changes_and_replaced_sources():
    args = [torch.randn(3, 2) for _ in range(3)]
    weights = StackedWeights()
    buffer, single = weights.add([0, 2], args), weights.add([1], args)
    assert weights.copied_bytes == 2 * 6 * 4  # one source alone is a view of itself: no copy
    address = buffer.data_ptr()
    args[2].mul_(2)  # in place: its version counter moves
    weights.refresh(args)
    assert_stacked(buffer, [args[0], args[2]])
    args = [torch.randn(3, 2), args[1], args[2]]  # a replaced source
    before = args[0].clone()
    weights.refresh(args)
    assert_stacked(buffer, [args[0], args[2]])
    args[2].data = torch.randn(3, 2)  # a new storage under the same object, version unchanged
    weights.refresh(args)
    assert_stacked(buffer, [args[0], args[2]])
    assert_stacked(single, [args[1]])
    assert buffer.data_ptr() == address  # updated in place: a CUDA graph reading it stays valid
    torch.testing.assert_close(args[0], before, rtol=0, atol=0)


def test_a_view_stack_sees_in_place_changes_and_follows_replaced_sources():
    storage = torch.randn(3, 4, 2)
    args = list(storage.unbind(0))
    weights = StackedWeights()
    buffer = weights.add([0, 1, 2], args)
    assert weights.copied_bytes == 0 and buffer.data_ptr() == storage.data_ptr()
    args[1].add_(1.0)
    weights.refresh(args)
    assert_stacked(buffer, storage)
    before = storage.clone()
    replaced = [args[0], torch.randn(4, 2), args[2]]
    weights.refresh(replaced)  # the storage is the user's: a copy, never a write into it
    assert_stacked(buffer, replaced)
    flat = storage.view(-1)  # same first address, other spacing
    respaced = [flat[4 * i : 4 * i + 8].view(4, 2) for i in range(3)]
    weights.refresh(respaced)
    assert_stacked(buffer, respaced)
    torch.testing.assert_close(storage, before, rtol=0, atol=0)


@torch.no_grad()
def test_parameters_move_into_the_buffer_and_writes_through_data_are_seen():
    ps = params(3, 4, 4)
    values = [p.clone() for p in ps]
    weights = StackedWeights()
    buffer = weights.add([0, 1, 2], ps)
    weights.refresh(ps)  # the first refresh moves them: same objects, same values, now slots
    assert weights.copied_bytes == 0
    assert all(p.data_ptr() == slot.data_ptr() for p, slot in zip(ps, buffer, strict=True))
    assert all(torch.equal(p, v) for p, v in zip(ps, values, strict=True))
    ps[1].data.mul_(2)  # no version counter moves, yet the buffer is the parameter
    weights.refresh(ps)
    assert_stacked(buffer, ps)
    address = buffer.data_ptr()
    ps[2].data = torch.randn(4, 4)  # a new storage: its values go into its slot, and it moves back
    weights.refresh(ps)
    assert_stacked(buffer, ps)
    assert buffer.data_ptr() == address and ps[2].data_ptr() == buffer[2].data_ptr()


@torch.no_grad()
def test_memory_held_elsewhere_is_never_written(caplog):
    ps = params(3, 4, 4)
    weights = StackedWeights()
    buffer = weights.add([0, 1, 2], ps)
    weights.refresh(ps)
    alias = ps[1].detach()  # the user holds the old slot of ps[1]
    before = alias.clone()
    ps[1].data = torch.randn(4, 4)
    with caplog.at_level(logging.INFO, logger="snlp_compile"):
        weights.refresh(ps)
    assert_stacked(buffer, ps)
    torch.testing.assert_close(alias, before, rtol=0, atol=0)
    assert weights.copied_bytes == buffer.nbytes and "reads a copy" in caplog.text
    ps[0].mul_(3)  # a copy follows version counters
    weights.refresh(ps)
    assert_stacked(buffer, ps)


@torch.no_grad()
def test_swapped_tied_and_misaligned_sources(caplog):
    ps = params(3, 4, 4)
    weights = StackedWeights()
    buffer = weights.add([0, 1, 2], ps)
    weights.refresh(ps)
    swapped = [ps[1], ps[0], ps[2]]  # each is another's slot: copied through a fresh storage
    weights.refresh(swapped)
    assert_stacked(buffer, swapped)
    with caplog.at_level(logging.INFO, logger="snlp_compile"):
        tied = [ps[0], ps[0], ps[2]]
        weights.refresh(tied)
        assert_stacked(buffer, tied)
        odd = params(2, 3)  # 12 bytes: a slot of a stack of them would not be 16-byte aligned
        odd_weights = StackedWeights()
        odd_buffer = odd_weights.add([0, 1], odd)
        odd_weights.refresh(odd)
    assert "tied weights" in caplog.text and "misaligned" in caplog.text
    assert odd_weights.copied_bytes == odd_buffer.nbytes
    assert_stacked(odd_buffer, odd)
