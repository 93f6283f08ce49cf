"""Hugging Face transformers decoders compile with backend="snlp" with no per-model code."""

import pytest
import torch

transformers = pytest.importorskip("transformers")


def llama():
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


def gpt2():
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=64, bos_token_id=0)
    config.eos_token_id = 0
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("build", [llama, gpt2])
@torch.no_grad()
def test_huggingface_decoders(build, caplog):
    model = build().eval()
    idx = torch.randint(0, 64, (2, 12))
    expected = model(idx, use_cache=False).logits
    options = {"iters": 4, "inner": "eager", "fallback": "error"}
    out = torch.compile(model, backend="snlp", options=options)(idx, use_cache=False).logits
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
    cheap = torch.compile(model, backend="snlp", options={**options, "iters": 1})(idx, use_cache=False).logits
    assert (cheap - expected).abs().max() > 1e-3  # the four layers really ran in parallel
