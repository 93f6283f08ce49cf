"""StackedWeights: the buffers always equal the stack of the current sources, and never write them."""

import pytest
import torch

from snlp_compile.stacked_weights import StackedWeights


def test_a_copied_stack_follows_in_place_changes_and_replaced_sources():
    args = [torch.randn(3, 2) for _ in range(3)]
    weights = StackedWeights()
    buffer, single = weights.add([0, 2], args), weights.add([1], args)
    assert weights.copied_bytes == 2 * 6 * 4  # one source alone is a view of itself: no copy
    address = buffer.data_ptr()
    args[2].mul_(2)  # in place: its version counter moves
    weights.refresh(args)
    torch.testing.assert_close(buffer, torch.stack([args[0], args[2]]), rtol=0, atol=0)
    args = [torch.randn(3, 2), args[1], args[2]]  # a replaced source
    before = args[0].clone()
    weights.refresh(args)
    torch.testing.assert_close(buffer, torch.stack([args[0], args[2]]), rtol=0, atol=0)
    torch.testing.assert_close(single, args[1].unsqueeze(0), rtol=0, atol=0)
    assert buffer.data_ptr() == address  # updated in place: a CUDA graph reading it stays valid
    torch.testing.assert_close(args[0], before, rtol=0, atol=0)


def test_a_view_stack_sees_in_place_changes_and_refuses_replaced_sources():
    storage = torch.randn(3, 4, 2)
    args = list(storage.unbind(0))
    weights = StackedWeights()
    buffer = weights.add([0, 1, 2], args)
    assert weights.copied_bytes == 0 and buffer.data_ptr() == storage.data_ptr()
    args[1].add_(1.0)
    weights.refresh(args)
    torch.testing.assert_close(buffer, storage, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="were replaced"):
        weights.refresh([args[0], torch.randn(4, 2), args[2]])
    flat = storage.view(-1)  # same first address, other spacing: still a replacement
    with pytest.raises(RuntimeError, match="were replaced"):
        weights.refresh([flat[4 * i : 4 * i + 8].view(4, 2) for i in range(3)])
