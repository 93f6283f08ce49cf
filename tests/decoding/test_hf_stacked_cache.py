"""StackedStaticCache: a transformers StaticCache whose layers' tensors are rows of stacked buffers,
written in place by the SNLP rewrite (no per-layer copies of the keys and values)."""

import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

import snlp_compile  # noqa: E402
from snlp_compile.decoding.hf_stacked_cache import stacked_layer_class  # noqa: E402
from tests.helpers.huggingface import COMMON, gpt2, llama  # noqa: E402

EXACT = {"iters": 4, "inner": "eager", "fallback": "error"}


def _generate(model, ids, cache, forward=None, **kwargs):
    original = model.forward
    model.forward = forward or original
    try:
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, past_key_values=cache, **kwargs
        )
    finally:
        model.forward = original


@torch.no_grad()
def test_layers_hold_rows_of_one_buffer_and_match_the_static_cache():
    torch.manual_seed(0)
    model = llama().eval()
    ids = torch.randint(1, 64, (2, 9))
    stacked = snlp_compile.StackedStaticCache.for_model(model, batch_size=2, max_cache_len=20)
    plain = transformers.StaticCache(config=model.config, max_cache_len=20)
    torch.testing.assert_close(model(ids, past_key_values=stacked).logits, model(ids, past_key_values=plain).logits)
    keys = stacked.layers[0]._stack_group.buffers["keys"]
    assert keys.shape == (4, 2, 2, 20, 8)
    for i, (mine, theirs) in enumerate(zip(stacked.layers, plain.layers, strict=True)):
        assert mine.keys.data_ptr() == keys[i].data_ptr() and isinstance(mine, transformers.cache_utils.StaticLayer)
        torch.testing.assert_close(mine.keys, theirs.keys)
        torch.testing.assert_close(mine.values, theirs.values)
        assert int(mine.cumulative_length) == 9
    stacked.crop(-3)
    assert stacked.get_seq_length() == 6
    stacked.reset()
    assert stacked.get_seq_length() == 0 and not keys.any()


@pytest.mark.parametrize("build", [llama, gpt2])
@torch.no_grad()
def test_generate_writes_the_stacked_rows_in_place_and_is_exact(build, caplog):
    """Prefill and every decode step rewritten; the keys and values are slices of the stacked buffers
    (only the count, incremented in place, goes through copies); tokens equal the uncompiled model's."""
    torch.manual_seed(0)
    model = build().eval()
    model.generation_config.pad_token_id = 0
    ids = torch.randint(1, 64, (2, 7))
    expected = _generate(model, ids, transformers.StaticCache(config=model.config, max_cache_len=13), do_sample=False)
    forward = torch.compile(model.forward, backend="snlp", options=EXACT)
    with caplog.at_level(logging.INFO, logger="snlp_compile"):
        cache = snlp_compile.StackedStaticCache.for_model(model, batch_size=2, max_cache_len=13)
        exact = _generate(model, ids, cache, forward, do_sample=False)
    assert torch.equal(exact, expected) and "unmodified" not in caplog.text
    copied = [line for line in caplog.text.splitlines() if "per-evaluation copies" in line]
    written = [line.split("write ")[1].split(" through")[0] for line in copied]
    assert written and all("cumulative_length" in w and "keys" not in w and "values" not in w for w in written)
    torch._dynamo.reset()
    one = torch.compile(model.forward, backend="snlp", options={"iters": 1, "inner": "eager"})
    approx = _generate(model, ids, snlp_compile.StackedStaticCache.for_model(model, 2, 13), one, do_sample=False)
    assert approx.shape == expected.shape and torch.equal(approx[:, :7], ids)


def test_layers_of_one_kind_must_match_and_stay_set():
    model = llama()
    cache = snlp_compile.StackedStaticCache(model.config, max_cache_len=8)
    with pytest.raises(ValueError, match="equal shapes"):
        cache.layers[0].keys = torch.zeros(1, 2, 8, 8)
        cache.layers[1].keys = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="cannot be unset"):
        cache.layers[0].keys = None
    with pytest.raises(TypeError, match="must be a tensor"):
        cache.layers[0].values = 3
    with pytest.raises(ValueError, match="offloading"):
        snlp_compile.StackedStaticCache(model.config, max_cache_len=8, offloading=True)


def test_the_stacked_layer_classes_leave_transformers_tables_alone():
    """A layer class a modeling file registers (`_layer_type`) keeps its entry when it is stacked."""
    mapping = transformers.cache_utils.STATIC_LAYER_TYPE_MAPPING

    class Registered(transformers.cache_utils.StaticLayer):
        _layer_type = "snlp_test_kind"

    try:
        assert mapping["snlp_test_kind"] is Registered
        stacked_layer_class(Registered)
        assert mapping["snlp_test_kind"] is Registered
    finally:
        del mapping["snlp_test_kind"]


def test_sliding_window_layers_stack_apart_from_full_ones():
    config = transformers.Gemma2Config(**COMMON, head_dim=8, sliding_window=4)
    model = transformers.Gemma2ForCausalLM(config).eval()
    cache = snlp_compile.StackedStaticCache.for_model(model, batch_size=1, max_cache_len=12)
    groups = {id(layer._stack_group): layer._stack_group for layer in cache.layers}
    assert sorted((g.kind, g.n_layers, g.buffers["keys"].shape[3]) for g in groups.values()) == [
        ("StaticLayer(12 positions)", 2, 12),
        ("StaticSlidingWindowLayer(4 positions)", 2, 4),
    ]
    ids = torch.randint(1, 64, (1, 6))
    plain = transformers.StaticCache(config=model.config, max_cache_len=12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, past_key_values=cache).logits, model(ids, past_key_values=plain).logits)
