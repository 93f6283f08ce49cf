"""Tiny random Hugging Face configurations shared by the Hugging Face tests (transformers must be installed)."""

import transformers

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
)


def llama() -> transformers.LlamaForCausalLM:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))


def gpt2() -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=64, bos_token_id=0)
    config.eos_token_id = config.pad_token_id = 0
    return transformers.GPT2LMHeadModel(config)
