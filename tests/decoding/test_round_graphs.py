"""Speculative rounds replayed as CUDA graphs: the noise drawn before a round, the graph store, the
fallback; on CUDA, graphed rounds against sequential decoding."""

import logging

import pytest
import torch

from snlp_compile import SNLPConfig, generate
from snlp_compile.decoding import Sampler
from snlp_compile.decoding.cuda_graph import _STORES, CaptureFailed, graphs_for
from snlp_compile.decoding.speculative import RoundGraphs
from snlp_compile.models import GPT, GPTConfig, StaticKVCache

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")


def test_exponential_race_samples_the_distribution():
    """argmax(p / E), E ~ Exp(1): a draw from p (unnormalised p allowed, zero-probability tokens never drawn)."""
    rows, probs = 40000, torch.tensor([0.1, 0.4, 0.0, 0.2, 0.3])
    sampler = Sampler(temperature=1.0, top_k=None, generator=torch.Generator().manual_seed(0))
    noise = sampler.round_noise(rows, 1, probs.numel(), torch.device("cpu"))
    assert noise.draft.shape == (rows, 1, 5) and noise.accept.shape == (rows, 1) and noise.verify.shape == (rows, 2, 5)
    drawn = sampler.sample(2 * probs.expand(rows, 5), noise.draft[:, 0])
    torch.testing.assert_close(torch.bincount(drawn, minlength=5) / rows, probs, atol=0.01, rtol=0)
    assert Sampler(temperature=0.0, top_k=None, generator=None).round_noise(rows, 1, 5, torch.device("cpu")) is None


def test_graph_store_is_kept_per_cache_for_the_latest_key_until_the_fingerprint_changes():
    model = torch.nn.Linear(2, 2)
    cache = StaticKVCache(GPTConfig.preset("tiny"), 1, 4)
    store = graphs_for(cache, "k", model)
    store.graphs["draft"] = "captured"
    assert graphs_for(cache, "k", model) is store  # not sealed yet: kept
    store.seal(model)
    assert graphs_for(cache, "k", model) is store
    assert graphs_for(cache, "other", model).graphs == {}  # a new key frees the old graphs
    assert graphs_for(cache, "k", model).graphs == {}
    for change in (
        lambda: model.weight.mul_(2),
        lambda: setattr(model, "weight", torch.nn.Parameter(torch.ones(2, 2))),
    ):
        store = graphs_for(cache, "k", model)
        store.graphs["draft"] = "captured"
        store.seal(model)
        with torch.no_grad():
            change()  # in place (a new version), or replaced (a new address)
        assert graphs_for(cache, "k", model).graphs == {}


def test_a_failed_capture_is_logged_and_the_rounds_run_uncaptured(caplog, monkeypatch):
    class Uncapturable:
        def __init__(self, fn, inputs, undo):
            raise CaptureFailed("operation not permitted when stream is capturing")

    monkeypatch.setattr("snlp_compile.decoding.speculative.CapturedCall", Uncapturable)
    cache = StaticKVCache(GPTConfig.preset("tiny"), 1, 4)
    model = torch.nn.Linear(1, 1)
    graphs = RoundGraphs(graphs_for(cache, "k", model), model)
    with caplog.at_level(logging.WARNING, logger="snlp_compile"):
        assert graphs.phases(print, repr, cache, (torch.zeros(1, 1), None), 2) == (print, repr)
    assert "run without CUDA graphs: capturing them failed (operation not permitted" in caplog.text
    caplog.clear()
    assert graphs.phases(print, repr, cache, (torch.zeros(1, 1), None), 2) == (print, repr)
    assert not caplog.text  # not tried again

    class WarmUpFails:
        def __init__(self, fn, inputs, undo):
            if fn is repr:
                raise torch.OutOfMemoryError("the verify warm-up ran out of memory")

        def __call__(self, *inputs):
            return torch.zeros(1, 1), torch.zeros(1, 1, 2)

    monkeypatch.setattr("snlp_compile.decoding.speculative.CapturedCall", WarmUpFails)
    graphs = RoundGraphs(graphs_for(cache, "new key", model), model)
    with pytest.raises(torch.OutOfMemoryError):
        graphs.phases(print, repr, cache, (torch.zeros(1, 1), None), 2)
    assert graphs_for(cache, "new key", model).graphs == {}  # no draft graph kept without its verify graph


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_rounds_give_the_sequential_tokens(dtype, caplog):
    """Greedy speculative decoding with graphed rounds returns the sequential tokens (bf16: up to near
    ties) and reuses its graphs across calls on one cache; sampled graphed rounds give the tokens the
    same rounds give uncaptured, from the same generator."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny")).cuda().to(dtype).eval()
    prompt = torch.randint(0, 64, (1, 9), device="cuda")
    cache = StaticKVCache(model.config, 1, 40, dtype=dtype, device="cuda")
    config = SNLPConfig(iters=1, cudagraphs=True, prefill="sequential")
    common = dict(kv_cache=cache, compile_sequential=True, draft_len=3)
    reference = generate(model, prompt, 30, config, mode="sequential", **common).tokens
    with caplog.at_level(logging.WARNING, logger="snlp_compile"):
        first = generate(model, prompt, 30, config, mode="speculative", **common)
        captured = dict(_STORES[cache].graphs)
        second = generate(model, prompt, 30, config, mode="speculative", **common)
    assert "without CUDA graphs" not in caplog.text
    assert _STORES[cache].graphs == captured and set(captured) == {"draft", "verify"}  # captured once
    agree = (first.tokens == reference).float().mean()
    assert torch.equal(first.tokens, reference) if dtype == torch.float32 else agree > 0.9
    assert torch.equal(second.tokens, first.tokens)
    assert first.stats.drafted > 0 and first.stats.phase_seconds["draft"] > 0
    sampled = {}
    for cudagraphs in (True, False):  # the same noise, the same compiled forwards: the same tokens
        generator = torch.Generator("cuda").manual_seed(0)
        run = config.replace(cudagraphs=cudagraphs)
        sampled[cudagraphs] = generate(
            model, prompt, 30, run, mode="speculative", temperature=1.0, generator=generator, **common
        ).tokens
    assert torch.equal(sampled[True], sampled[False])
    assert sampled[True].min() >= 0 and sampled[True].max() < model.config.vocab_size
