"""The KV cache's write op: index_copy_ semantics, and an in-place write when compiled."""

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from snlp_compile.models import GPT, StaticKVCache
from snlp_compile.models.kv_cache import cache_write_
from snlp_compile.passes.detect import mutated_arg, written_arg


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


@pytest.mark.parametrize(
    "compile_options",
    [{}, dict(backend="snlp", options=dict(n_seq=1, iters=2, fallback="error"))],
    ids=["inductor", "snlp-inductor"],
)
@torch.no_grad()
def test_a_compiled_decode_step_writes_the_cache_in_place(make_model, compile_options):
    """No buffer of the cache's, a layer's or the SNLP block's cache size in inductor's code (a
    write through a view as index_copy_ copies every layer's cache and the whole cache back), and
    the same logits and cache as eager (iters = block size: exact)."""
    model = make_model(GPT)
    caches = [StaticKVCache(model.config, batch_size=1, max_seq_len=24) for _ in range(2)]
    prompt, token = torch.randint(0, model.config.vocab_size, (1, 6)), torch.tensor([[3]])
    for cache in caches:
        model(prompt, kv_cache=cache)
    compiled = torch.compile(model, dynamic=False, **compile_options)
    out, codes = run_and_get_code(compiled, token, kv_cache=caches[0])
    torch.testing.assert_close(out, model(token, kv_cache=caches[1]), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(caches[0].k, caches[1].k, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(caches[0].v, caches[1].v, atol=2e-5, rtol=2e-5)
    whole = tuple(caches[0].k.shape)
    shapes = [whole, whole[1:], (whole[0] - 1, *whole[1:])]
    assert codes and not any(f"empty_strided_cpu({shape}" in code for code in codes for shape in shapes)


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
