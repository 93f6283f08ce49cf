"""StaticKVCache: an in-place write when compiled, and models/ self-contained."""

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import snlp_compile.models
from snlp_compile.models import GPT, StaticKVCache
from tests.helpers.imports import imported_modules


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


def test_models_import_nothing_of_the_package_outside_models():
    imports = imported_modules(snlp_compile.models)
    assert "kv_cache.py" in imports and "snlp_compile.models.config" in imports["kv_cache.py"]
    outside = {
        file: sorted(n for n in names if n.split(".")[0] == "snlp_compile" and not n.startswith("snlp_compile.models"))
        for file, names in imports.items()
    }
    assert not any(outside.values()), outside
