import pytest
import torch

from snlp_compile.models import GPT, MHCGPT, GPTConfig, StaticKVCache
from snlp_compile.models.layers import apply_rotary, rotary_tables


def decode_token_by_token(model, idx, cache):
    return torch.cat([model(idx[:, t : t + 1], kv_cache=cache) for t in range(idx.size(1))], dim=1)


# --- config -----------------------------------------------------------------------------------------


def test_presets():
    assert GPTConfig.preset("tiny").n_kv_head == 4

    def sizes(c: GPTConfig) -> tuple[int, ...]:
        return c.vocab_size, c.n_layer, c.n_embd, c.n_head, c.sequence_len

    assert sizes(GPTConfig.preset("d20")) == (65536, 20, 1280, 10, 2048)
    assert GPTConfig.preset("d20").head_dim == 128
    assert sizes(GPTConfig.preset("paper-0.5b")) == (65536, 32, 640, 5, 2048)
    assert sizes(GPTConfig.preset("char")) == (128, 8, 384, 6, 256)
    assert GPTConfig.preset("tiny", n_head=2).n_kv_head == 2
    for name in ("tiny", "char"):
        assert GPT(GPTConfig.preset(name)).num_params() > 0
    with pytest.raises(ValueError, match="tiny"):
        GPTConfig.preset("nope")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n_embd=30, n_head=4), "n_embd"),
        (dict(n_head=4, n_kv_head=3), "n_kv_head"),
        (dict(n_embd=12, n_head=4), "head_dim"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(window_pattern=(0, None)), "window_pattern"),
        (dict(window_pattern=()), "window_pattern"),
        (dict(softcap=0.0), "softcap"),
    ],
)
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**kwargs)


def test_window_for_layer():
    config = GPTConfig(n_layer=5, window_pattern=(8, None))
    assert [config.window_for_layer(i) for i in range(5)] == [8, None, 8, None, 8]
    assert GPTConfig().window_for_layer(0) is None


# --- layers -----------------------------------------------------------------------------------------


def test_rotary_preserves_norm_and_relative_positions():
    cos, sin = rotary_tables(16, 8)
    assert cos.shape == sin.shape == (16, 4)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    rq = apply_rotary(q.expand(1, 16, 1, 8), cos, sin)
    rk = apply_rotary(k.expand(1, 16, 1, 8), cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1).expand(1, 16, 1))
    dots = (rq[0, :, None, 0] * rk[0, None, :, 0]).sum(-1)  # [16, 16], depends only on i - j
    torch.testing.assert_close(dots[5, 3], dots[9, 7])


# --- model ------------------------------------------------------------------------------------------


def test_output_shape(make_model, model_cls):
    model = make_model(model_cls)
    logits = model(torch.randint(0, 64, (2, 7)))
    assert logits.shape == (2, 7, 64) and logits.dtype == torch.float32


def test_bad_inputs(make_model, model_cls):
    model = make_model(model_cls)
    with pytest.raises(ValueError, match="2-D integer"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="2-D integer"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="sequence length"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="sequence length"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_causal(make_model, model_cls):
    model = make_model(model_cls)
    a = torch.randint(0, 64, (1, 12))
    b = a.clone()
    b[:, 8:] = (b[:, 8:] + 1) % 64
    la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :8], lb[:, :8])
    assert not torch.allclose(la[:, 8:], lb[:, 8:])


def test_window_changes_only_far_positions(make_model, model_cls):
    full, windowed = make_model(model_cls), make_model(model_cls, window_pattern=(8, None))
    windowed.load_state_dict(full.state_dict())
    idx = torch.randint(0, 64, (1, 20))
    lf, lw = full(idx), windowed(idx)
    torch.testing.assert_close(lf[:, :8], lw[:, :8])
    assert not torch.allclose(lf[:, 8:], lw[:, 8:])


def test_kv_cache_decode_matches_full(make_model, model_cls, variant):
    model = make_model(model_cls, **variant)
    idx = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = StaticKVCache(model.config, batch_size=2)
        torch.testing.assert_close(decode_token_by_token(model, idx, cache), full, atol=1e-5, rtol=1e-5)
        assert int(cache.pos) == 20 and cache.remaining == 12
        # prefill a chunk, then decode
        cache.reset()
        prefill = model(idx[:, :11], kv_cache=cache)
        out = torch.cat([prefill, decode_token_by_token(model, idx[:, 11:], cache)], dim=1)
        torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
        # rollback, decode something else, rollback again, re-decode the original tokens
        cache.rollback(6)
        other = (idx[:, 14:] + 1) % 64
        model(other, kv_cache=cache)
        cache.rollback(6)
        redo = decode_token_by_token(model, idx[:, 14:], cache)
        torch.testing.assert_close(redo, full[:, 14:], atol=1e-5, rtol=1e-5)


def test_kv_cache_errors(make_model, model_cls):
    model = make_model(model_cls)
    cache = StaticKVCache(model.config, batch_size=1, max_seq_len=8)
    assert cache.k.shape == (3, 1, 4, 8, 8) and cache.pos.shape == () and cache.pos.dtype == torch.int64
    model(torch.zeros(1, 6, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="batch size"):
        model(torch.zeros(2, 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="rollback"):
        cache.rollback(7)
    cache.rollback(2)  # checked
    cache.rewind(3)  # unchecked: the caller counts positions
    assert int(cache.pos) == 1
    with pytest.raises(ValueError, match="max_seq_len"):
        StaticKVCache(model.config, batch_size=1, max_seq_len=33)


def test_compile_fullgraph(make_model, model_cls, base_or_all):
    torch._dynamo.reset()
    model = make_model(model_cls, **base_or_all)
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        expected = model(idx)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(idx), expected)


def test_residual_branches_nontrivial(make_model):
    model = make_model(GPT)
    x = torch.randn(2, 8, model.config.n_embd)
    y = model.blocks[0].mlp(x)
    assert 0.05 < y.std() / x.std() < 2.0


def test_gpt_and_mhc_share_the_decoder():
    assert GPT.forward is MHCGPT.forward
