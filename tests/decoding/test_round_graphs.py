"""Speculative rounds replayed as CUDA graphs: the noise drawn before a round, the graph store, the
fallback; on CUDA, graphed rounds against sequential decoding."""

import logging

import pytest
import torch

from snlp_compile import SNLPConfig, generate
from snlp_compile.decoding import Sampler
from snlp_compile.decoding.cuda_graph import _GRAPHS, fingerprint, graphs_for
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


def test_graph_store_is_kept_per_cache_and_key_until_the_fingerprint_changes():
    model = torch.nn.Linear(2, 2)
    cache = StaticKVCache(GPTConfig.preset("tiny"), 1, 4)
    store = graphs_for(cache, "k", fingerprint(model))
    store["draft"] = "captured"
    assert graphs_for(cache, "k", fingerprint(model)) is store
    assert graphs_for(cache, "other", fingerprint(model)) == {}
    with torch.no_grad():
        model.weight.mul_(2)  # in place: the version changes
    store = graphs_for(cache, "k", fingerprint(model))
    assert store == {}
    store["draft"] = "captured"
    model.weight = torch.nn.Parameter(torch.ones(2, 2))  # replaced: the address changes
    assert graphs_for(cache, "k", fingerprint(model)) == {}


def test_a_failed_capture_is_logged_and_the_rounds_run_uncaptured(caplog):
    def draft(token, noise):
        raise RuntimeError("not capturable here")

    graphs = RoundGraphs({})
    with caplog.at_level(logging.WARNING, logger="snlp_compile"):
        phases = graphs.phases(
            draft, print, StaticKVCache(GPTConfig.preset("tiny"), 1, 4), (torch.zeros(1, 1), None), 2
        )
    assert phases == (draft, print)
    assert "run without CUDA graphs: capturing them failed" in caplog.text
    assert graphs.phases(draft, print, None, (None, None), 2) == (draft, print)  # not tried again


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_rounds_give_the_sequential_tokens(dtype, caplog):
    """Greedy speculative decoding with graphed rounds returns the sequential tokens (bf16: up to near
    ties), reuses its graphs across calls on one cache, and recaptures after a parameter is replaced."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny")).cuda().to(dtype).eval()
    prompt = torch.randint(0, 64, (1, 9), device="cuda")
    cache = StaticKVCache(model.config, 1, 40, dtype=dtype, device="cuda")
    config = SNLPConfig(iters=1, cudagraphs=True, prefill="sequential")
    common = dict(kv_cache=cache, compile_sequential=True, draft_len=3)
    reference = generate(model, prompt, 30, config, mode="sequential", **common).tokens
    with caplog.at_level(logging.WARNING, logger="snlp_compile"):
        first = generate(model, prompt, 30, config, mode="speculative", **common)
        second = generate(model, prompt, 30, config, mode="speculative", **common)
    assert "without CUDA graphs" not in caplog.text
    (store,) = (graphs for _, graphs in _GRAPHS[cache].values())
    assert {"draft", "verify"} <= store.keys()  # captured once, replayed by both calls
    agree = (first.tokens == reference).float().mean()
    assert torch.equal(first.tokens, reference) if dtype == torch.float32 else agree > 0.9
    assert torch.equal(second.tokens, first.tokens)
    assert first.stats.drafted > 0 and first.stats.phase_seconds["draft"] > 0
    sampled = generate(model, prompt, 30, config, mode="speculative", temperature=1.0, **common).tokens
    assert sampled.min() >= 0 and sampled.max() < model.config.vocab_size
