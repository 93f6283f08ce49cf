"""generate/stream: SNLP and self-speculative decoding against sequential decoding (CPU, tiny models)."""

import dataclasses
import gc
import weakref

import pytest
import torch

from snlp_compile import Generation, SNLPConfig, generate, stream
from snlp_compile.decoding import Sampler, compiled_forward, verify_drafts
from snlp_compile.models import GPT, MHCGPT, GPTConfig, StaticKVCache

BATCH, CACHE_LEN, NEW = 2, 24, 10
EXACT = SNLPConfig(iters=4, inner="eager", fallback="error", prefill="sequential")  # iters = n_layer: exact
CHEAP = SNLPConfig(iters=1, inner="eager", fallback="error", prefill="sequential")


@pytest.fixture(scope="module", autouse=True)
def no_silent_eager():
    """A compiled callable that hits dynamo's recompile limit must fail, not silently run eagerly."""
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield


@pytest.fixture(scope="module")
def models() -> dict[type, torch.nn.Module]:
    torch.manual_seed(0)
    config = GPTConfig.preset("tiny", sinkhorn_iters=4)  # fewer Sinkhorn steps: a faster MHCGPT on CPU
    return {cls: cls(config).eval() for cls in (GPT, MHCGPT)}


@pytest.fixture(params=[GPT, MHCGPT], ids=["gpt", "mhc"])
def model(request, models) -> torch.nn.Module:
    return models[request.param]


@pytest.fixture
def gpt(models) -> torch.nn.Module:
    return models[GPT]


def _prompt(length: int, seed: int = 1, batch: int = BATCH) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def _cache(model: torch.nn.Module) -> StaticKVCache:
    """A cache of one fixed shape, so that each compiled callable compiles one decode graph."""
    return StaticKVCache(model.config, BATCH, CACHE_LEN)


def _sequential(model: torch.nn.Module, prompt: torch.Tensor, n_new: int = NEW, **kwargs) -> torch.Tensor:
    return generate(model, prompt, n_new, mode="sequential", **kwargs).tokens


def test_snlp_exact_config_decodes_like_sequential(model):
    for prompt_len in (1, 9):
        prompt = _prompt(prompt_len, seed=prompt_len)
        out = generate(model, prompt, NEW, config=EXACT, mode="snlp", kv_cache=_cache(model))
        assert isinstance(out, Generation)
        assert out.tokens.shape == (BATCH, prompt_len + NEW) and out.tokens.dtype == torch.int64
        assert torch.equal(out.tokens, _sequential(model, prompt))
        assert out.stats.model_calls == NEW and out.stats.new_tokens == NEW and out.stats.acceptance_rate is None
        assert out.stats.seconds > 0 and out.stats.tokens_per_s > 0


def test_snlp_prefill_through_the_compiled_model(gpt):
    prompt = _prompt(7, seed=2)
    config = EXACT.replace(prefill="snlp")
    out = generate(gpt, prompt, NEW, config=dataclasses.asdict(config), mode="snlp", kv_cache=_cache(gpt))
    assert torch.equal(out.tokens, _sequential(gpt, prompt))


def test_speculative_greedy_is_sequential_greedy(model):
    prompt = _prompt(5, seed=3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    seq_cache = _cache(model)
    reference = _sequential(model, prompt, kv_cache=seq_cache)
    # the iters=1 drafter really is approximate, so the equalities below are not trivial
    cache, last = _cache(model), prompt[:, -1:].contiguous()
    with torch.no_grad():
        model(prompt, kv_cache=cache)
        draft_logits = compiled_forward(model, CHEAP)(last, cache)
        cache.rollback(1)
        assert (draft_logits - model(last, kv_cache=cache)).abs().max() > 1e-3
    for draft_len in (1, 4):
        spec_cache = _cache(model)
        out = generate(model, prompt, NEW, config=CHEAP, mode="speculative", draft_len=draft_len, kv_cache=spec_cache)
        assert torch.equal(out.tokens, reference)
        stats = out.stats
        assert 0.0 <= stats.acceptance_rate <= 1.0 and stats.drafted > 0 and stats.new_tokens == NEW
        assert stats.model_calls == 1 + stats.drafted + (stats.new_tokens - 1 - stats.accepted)
        phases = stats.phase_seconds
        assert set(phases) == {"draft", "verify"} and min(phases.values()) > 0 and sum(phases.values()) < stats.seconds
        # rejected drafts were rolled back: the cache holds the sequential K/V of every fed-back token
        filled = int(seq_cache.pos)
        assert filled == 5 + NEW - 1 and int(spec_cache.pos) == filled
        torch.testing.assert_close(spec_cache.k[..., :filled, :], seq_cache.k[..., :filled, :])
        torch.testing.assert_close(spec_cache.v[..., :filled, :], seq_cache.v[..., :filled, :])
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name


@pytest.mark.parametrize("mode", ["sequential", "speculative"])
def test_sampling(gpt, mode):
    """Reproducible with a fixed generator, valid ids, top_k=1 is greedy, top_k=3 keeps to the top 3."""
    prompt = _prompt(3, seed=4)

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        kwargs = dict(config=CHEAP, mode=mode, temperature=0.8, generator=g, draft_len=2, kv_cache=_cache(gpt))
        return generate(gpt, prompt, NEW, **kwargs).tokens

    first = run(0)
    assert torch.equal(first, run(0))
    assert not torch.equal(first, run(1))
    assert torch.equal(first[:, :3], prompt)
    assert first.min() >= 0 and first.max() < gpt.config.vocab_size

    g = torch.Generator().manual_seed(0)
    common = dict(config=CHEAP, mode=mode, temperature=1.5, generator=g, draft_len=2)
    top1 = generate(gpt, prompt, NEW, top_k=1, kv_cache=_cache(gpt), **common).tokens
    assert torch.equal(top1, _sequential(gpt, prompt))
    tokens = generate(gpt, prompt, NEW, top_k=3, kv_cache=_cache(gpt), **common).tokens
    with torch.no_grad():
        logits = gpt(tokens[:, :-1])
    allowed = logits.topk(3, dim=-1).indices[:, 2:]  # predictions for the new positions
    assert (allowed == tokens[:, 3:, None]).any(-1).all()


def test_verify_drafts_samples_the_target_distribution():
    """The rejection rule emits tokens distributed as p, whatever q drafted them (k = 2 positions)."""
    rows, vocab = 40000, 5
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.1, 0.4, 0.2, 0.3, 0.0], [0.5, 0.1, 0.1, 0.1, 0.2], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.4, 0.1, 0.1, 0.2, 0.2], [0.1, 0.6, 0.1, 0.1, 0.1]])
    sampler = Sampler(temperature=1.0, top_k=None, generator=g)
    drafts = sampler.sample(q.expand(rows, 2, vocab))
    accepted, tokens = verify_drafts(drafts, p.expand(rows, 3, vocab), q.expand(rows, 2, vocab), sampler)
    assert accepted.min() >= 0 and accepted.max() <= 2
    first = torch.bincount(tokens[:, 0], minlength=vocab) / rows
    torch.testing.assert_close(first, p[0], atol=0.015, rtol=0)
    second = torch.bincount(tokens[accepted >= 1, 1], minlength=vocab) / int((accepted >= 1).sum())
    torch.testing.assert_close(second, p[1], atol=0.015, rtol=0)
    assert abs(float((accepted >= 1).float().mean()) - float(torch.minimum(p[0], q[0]).sum())) < 0.015
    assert torch.equal(tokens[accepted >= 1, 0], drafts[accepted >= 1, 0])


def test_verify_drafts_greedy_accepts_the_agreeing_prefix():
    sampler = Sampler(temperature=0.0, top_k=None, generator=None)
    target = torch.tensor([[3, 1, 4, 1]])  # argmax of p at positions 0..3
    p = sampler.probs(torch.nn.functional.one_hot(target, 6).float())
    drafts = torch.tensor([[3, 1, 2]])
    q = sampler.probs(torch.nn.functional.one_hot(drafts, 6).float())
    accepted, tokens = verify_drafts(drafts, p, q, sampler)
    assert accepted.tolist() == [2] and tokens[0, :3].tolist() == [3, 1, 4]
    accepted, tokens = verify_drafts(target[:, :3], p, sampler.probs(p[:, :3]), sampler)
    assert accepted.tolist() == [3] and tokens.tolist() == [[3, 1, 4, 1]]


def test_stream_yields_what_generate_returns(gpt):
    prompt, draft_len = _prompt(6, seed=6), 3
    for mode in ("snlp", "speculative"):
        tokens = stream(gpt, prompt, NEW, config=CHEAP, mode=mode, draft_len=draft_len, kv_cache=_cache(gpt))
        chunks = list(tokens)
        longest = 1 if mode == "snlp" else draft_len + 1
        assert all(c.shape[0] == BATCH and 1 <= c.shape[1] <= longest for c in chunks)
        assert chunks[0].shape[1] == 1  # the prefill's token comes first, on its own
        assert tokens.stats.new_tokens == NEW and tokens.stats.seconds > 0
        out = generate(gpt, prompt, NEW, config=CHEAP, mode=mode, draft_len=draft_len, kv_cache=_cache(gpt))
        assert torch.equal(torch.cat(chunks, dim=1), out.tokens[:, 6:])


def test_compiled_once_per_model_and_config(gpt):
    generate(gpt, _prompt(2), 3, config=CHEAP, mode="snlp", kv_cache=_cache(gpt))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    generate(gpt, _prompt(8, seed=7), 5, config=dataclasses.asdict(CHEAP), mode="snlp", kv_cache=_cache(gpt))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_compiles_of_different_models_and_configs_do_not_share_a_recompile_limit(models):
    """Each (model, config) compile owns its dynamo cache: with a limit of one graph per code object,
    two models and two configs still compile (the autouse fixture turns a limit hit into an error)."""
    idx = _prompt(1)
    with torch._dynamo.config.patch(recompile_limit=1), torch.no_grad():
        for model in models.values():
            for config in (None, dataclasses.replace(CHEAP, fuse=2)):
                cache = _cache(model)
                compiled_forward(model, config)(idx, cache)


def test_one_dim_prompt_and_default_cache(gpt):
    prompt = torch.tensor([5, 9, 2], dtype=torch.int32)
    out = generate(gpt, prompt, 4, mode="sequential")
    assert out.tokens.shape == (1, 7) and torch.equal(out.tokens[0, :3], prompt.long())
    assert torch.equal(out.tokens, _sequential(gpt, prompt[None].long(), 4))


def test_compiled_model_cache_does_not_keep_the_model_alive():
    model = GPT(GPTConfig.preset("tiny", n_layer=2))
    generate(model, torch.tensor([1, 2, 3]), 2, config=SNLPConfig(iters=2, inner="eager"), mode="snlp")
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize(
    "prompt,kwargs,match",
    [
        (torch.zeros(1, 0, dtype=torch.long), {}, "at least one token"),
        (torch.zeros(0, dtype=torch.long), {}, "at least one token"),
        (torch.zeros(1, 65, dtype=torch.long), {}, "exceeds the model's context"),
        (torch.zeros(1, 60, dtype=torch.long), dict(max_new_tokens=5), "max_new_tokens must be <= 4"),
        (torch.zeros(1, 3), {}, "int32/int64"),
        (torch.zeros(1, 1, 3, dtype=torch.long), {}, "int32/int64"),
        (torch.full((1, 3), 64), {}, r"\[0, vocab_size=64\)"),
        (torch.zeros(1, 3, dtype=torch.long), dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (torch.zeros(1, 3, dtype=torch.long), dict(mode="beam"), "mode must be one of"),
        (torch.zeros(1, 3, dtype=torch.long), dict(temperature=-0.5), "temperature must be"),
        (torch.zeros(1, 3, dtype=torch.long), dict(temperature=float("nan")), "temperature must be"),
        (torch.zeros(1, 3, dtype=torch.long), dict(top_k=0), r"top_k must be None or an integer in \[1, vocab"),
        (torch.zeros(1, 3, dtype=torch.long), dict(top_k=65), r"top_k must be None or an integer in \[1, vocab"),
        (torch.zeros(1, 3, dtype=torch.long), dict(draft_len=0), "draft_len must be an integer >= 1"),
        (torch.zeros(1, 3, dtype=torch.long), dict(config=dict(iters=0)), "SNLPConfig.iters"),
        (torch.zeros(2, 3, dtype=torch.long), dict(kv_cache="batch1"), "kv_cache batch size 1"),
        (torch.zeros(1, 30, dtype=torch.long), dict(kv_cache="batch1"), "kv_cache max_seq_len=24 must be >= "),
        (torch.zeros(1, 3, dtype=torch.long), dict(kv_cache="2 layers"), r"another model: it has \{'n_layer': 2"),
        (torch.zeros(1, 3, dtype=torch.long), dict(kv_cache="wider"), r"'head_dim': 16\}, the model needs"),
    ],
)
def test_errors(gpt, prompt, kwargs, match):
    kwargs = dict(max_new_tokens=4, **kwargs) if "max_new_tokens" not in kwargs else kwargs
    caches = {"batch1": {}, "2 layers": dict(n_layer=2), "wider": dict(n_embd=64)}
    if kwargs.get("kv_cache") in caches:
        other = dataclasses.replace(gpt.config, **caches[kwargs["kv_cache"]])
        kwargs["kv_cache"] = StaticKVCache(other, 1, CACHE_LEN)
    with pytest.raises(ValueError, match=match):
        stream(gpt, prompt, **kwargs)


def test_sequential_compile_takes_cuda_graphs_from_the_config(monkeypatch):
    """compile_sequential with config.cudagraphs compiles the sequential forward in "reduce-overhead"
    mode, one compile per (model, cudagraphs); the mode is dropped here, as CPUs have no CUDA graphs."""
    modes, compile_ = [], torch.compile

    def recording_compile(fn, **kwargs):
        modes.append(kwargs.pop("mode", None))
        return compile_(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    model = GPT(GPTConfig.preset("tiny")).eval()
    out = generate(
        model,
        _prompt(3),
        2,
        config=dataclasses.replace(CHEAP, cudagraphs=True),
        mode="sequential",
        compile_sequential=True,
        kv_cache=_cache(model),
    )
    assert modes == ["reduce-overhead"] and torch.equal(out.tokens, _sequential(model, _prompt(3), 2))
    compiled_forward(model, None, cudagraphs=True)
    compiled_forward(model, None, cudagraphs=False)
    assert modes == ["reduce-overhead", None]
