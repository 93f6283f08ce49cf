"""Hugging Face decoders nobody here wrote, tiny random configs: generate() with the default
DynamicCache, the StaticCache and a StackedStaticCache returns the uncompiled model's tokens at K = L,
and every graph of prefill and decode is rewritten (no fallback); an encoder (BERT) is rewritten in its
default call."""

import io
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")
T = transformers

import snlp_compile  # noqa: E402
from tests.helpers.huggingface import COMMON  # noqa: E402

DECODERS = {
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**COMMON)),
    "gemma2 (sliding windows, softcap)": lambda: T.Gemma2ForCausalLM(
        T.Gemma2Config(**COMMON, head_dim=8, sliding_window=8, final_logit_softcapping=15.0)
    ),
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**COMMON)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**COMMON, sliding_window=8)),
    "mixtral (MoE)": lambda: T.MixtralForCausalLM(
        T.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
    ),
    "falcon (parallel attention and MLP)": lambda: T.FalconForCausalLM(
        T.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, pad_token_id=0)
    ),
}


@pytest.fixture
def snlp_log():
    """The snlp_compile log lines (INFO and up) of the test."""
    stream, logger = io.StringIO(), logging.getLogger("snlp_compile")
    handler, level = logging.StreamHandler(stream), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.mark.slow
@pytest.mark.parametrize("cache", [None, "static", "stacked"])
@pytest.mark.parametrize("name", sorted(DECODERS))
@torch.no_grad()
def test_generate_matches_the_uncompiled_model(name, cache, snlp_log):
    torch.manual_seed(0)
    model = DECODERS[name]().eval()
    model.generation_config.pad_token_id = 0
    idx = torch.randint(1, 64, (2, 7))
    kwargs = dict(attention_mask=torch.ones_like(idx), max_new_tokens=4, do_sample=False)
    model.generation_config.cache_implementation = None if cache == "stacked" else cache
    expected = model.generate(idx, **kwargs)
    if cache == "stacked":  # the compiled run's cache (the uncompiled run used the default one)
        kwargs["past_key_values"] = snlp_compile.StackedStaticCache.for_model(model, 2, 11)
    torch._dynamo.reset()
    original = model.forward
    model.forward = torch.compile(original, backend="snlp", options={"iters": 4, "inner": "eager"})
    try:
        tokens = model.generate(idx, **kwargs)
    finally:
        model.forward = original
    lines = snlp_log.getvalue().splitlines()
    assert torch.equal(tokens, expected)
    assert not [line for line in lines if "unmodified" in line]
    assert sum("rewrote" in line for line in lines) >= 2  # prefill and the decode step(s)


@torch.no_grad()
def test_bert_encoder_is_rewritten():
    torch.manual_seed(0)
    config = T.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64
    )
    model = T.BertModel(config).eval()
    idx = torch.randint(1, 64, (2, 9))
    expected = model(idx).last_hidden_state
    options = {"iters": 4, "inner": "eager", "fallback": "error"}
    torch.testing.assert_close(torch.compile(model, backend="snlp", options=options)(idx).last_hidden_state, expected)
