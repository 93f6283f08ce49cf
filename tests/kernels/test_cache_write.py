"""snlp::cache_write_: index_copy_ semantics, the write the detector reads off its schema, and its vmap rule."""

import pytest
import torch

from snlp_compile.fx.writes import mutated_arg, written_arg
from snlp_compile.kernels.cache_write import cache_write_


def test_cache_write_is_index_copy_on_the_view():
    cache = torch.randn(3, 2, 4, 8, 5)
    expected = cache.clone()
    index, source = torch.tensor([6, 1]), torch.randn(2, 4, 2, 5)
    cache_write_(cache[1], 2, index, source)
    expected[1].index_copy_(2, index, source)
    torch.testing.assert_close(cache, expected, rtol=0, atol=0)


def test_the_detector_reads_the_written_argument_from_the_schema():
    graph = torch.fx.Graph()
    cache, index, source = (graph.placeholder(name) for name in ("cache", "index", "source"))
    write = graph.call_function(cache_write_._opoverload, (cache, 2, index, source))
    assert written_arg(write) == (("args", 0), cache)
    assert mutated_arg(graph.call_function(torch.ops.aten.index_copy.default, (cache, 2, index, source))) is None
    assert mutated_arg(graph.call_function(torch.ops.aten.index_copy_.default, (cache, 2, index, source))) is cache
    out = graph.call_function(torch.ops.aten.add.out, (index, source), {"out": cache})
    assert written_arg(out) == (("kwargs", "out"), cache)


@pytest.mark.parametrize("per_layer_index", [False, True])
def test_cache_write_under_vmap_writes_each_layers_slice(per_layer_index):
    cache = torch.zeros(5, 2, 3, 6, 4)
    expected = cache.clone()
    source = torch.randn(3, 2, 3, 2, 4)
    index = torch.tensor([[4, 1], [0, 5], [2, 3]]) if per_layer_index else torch.tensor([4, 1])

    def write(layer_cache, layer_source, layer_index):
        cache_write_(layer_cache, -2, layer_index, layer_source)
        return layer_cache.sum()

    torch.vmap(write, in_dims=(0, 0, 0 if per_layer_index else None))(cache[1:4], source, index)
    for layer in range(3):
        layer_index = index[layer] if per_layer_index else index
        expected[1 + layer].index_copy_(2, layer_index, source[layer])
    torch.testing.assert_close(cache, expected, rtol=0, atol=0)


def test_cache_write_under_vmap_cache_on_another_dim_and_a_shared_source():
    cache = torch.zeros(2, 3, 6, 4)  # the layers on dim 1
    expected = cache.clone()
    source = torch.randn(2, 1, 4)  # the same new entry for every layer
    index = torch.tensor([5])

    def write(layer_cache, layer_source, dim=1):
        cache_write_(layer_cache, dim, index, layer_source)
        return layer_cache.sum()

    torch.vmap(write, in_dims=(1, None))(cache, source)
    for layer in range(3):
        expected[:, layer].index_copy_(1, index, source)
    torch.testing.assert_close(cache, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="batch the cache"):
        torch.vmap(write, in_dims=(None, 0))(cache[:, 0], torch.randn(3, 2, 1, 4))
    with pytest.raises(IndexError, match="dim must be in"):
        torch.vmap(write, in_dims=(1, None, None))(cache, source, 3)
