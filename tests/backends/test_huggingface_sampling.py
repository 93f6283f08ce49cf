"""Sampled assisted generation with the SNLP drafter follows the model's own distribution.

A tiny Llama with 8 tokens, so that distributions are estimable: N sampled generations of three new
tokens (Hugging Face's assisted generation takes batch 1 only, so one generate() per sample, from one
seeded random stream) against the model's exact probabilities from its logits, by Pearson's
chi-square test (cells expected below 5 pooled). The drafter runs at iters=1, where its drafts'
distribution q is far from the model's p: the samples must follow p (the acceptance rule at work),
and the same test must reject q for them (the test has the power to see a wrong rule). Plain sampled
generate() from the same stream is the control.

Thresholds: a sampler with the right distribution fails one test with probability ALPHA; the seeds
are fixed, so the outcome is deterministic, not flaky. Against q the statistic grows as
N * chi2(p || q): at these weights its p-value is far below ALPHA (below 1e-40).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.helpers.huggingface import COMMON  # noqa: E402

VOCAB, NEW, N, ALPHA, MIN_EXPECTED = 8, 3, 300, 1e-3, 5.0
PROMPT = torch.tensor([[1, 2, 3, 4]])


def _model() -> transformers.LlamaForCausalLM:
    """Weights at std 0.2: peaked, distinct next-token distributions (at std 0.02 all are near uniform)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        **{**COMMON, "vocab_size": VOCAB, "max_position_embeddings": 32, "pad_token_id": None},
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=None,  # no early stop: every sample has NEW tokens
    )
    return transformers.LlamaForCausalLM(config).eval()


def _next_token_probs(forward, prefixes: torch.Tensor) -> torch.Tensor:
    """p(next token | prefix) [P, V] in float64, for prefixes [P, T]."""
    return forward(prefixes).logits[:, -1].double().softmax(-1)


def _distributions(forward) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact joint of the first two new tokens [V, V] and the marginal of the third [V]."""
    first = _next_token_probs(forward, PROMPT)[0]
    one = torch.cat([PROMPT.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], dim=1)
    joint = first[:, None] * _next_token_probs(forward, one)
    two = torch.cat(
        [PROMPT.expand(VOCAB * VOCAB, -1), torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))], 1
    )
    third = (joint.reshape(-1, 1) * _next_token_probs(forward, two)).sum(0)
    return joint, third


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness-of-fit p-value of counts [K] under probs [K]. The cells of least
    expected count are pooled into one until the pool and every other cell expect >= MIN_EXPECTED."""
    counts, expected = counts.double().flatten(), probs.double().flatten() * counts.sum()
    order = expected.argsort()
    pooled = int((expected[order].cumsum(0) < MIN_EXPECTED).sum()) + 1  # the smallest cells up to MIN_EXPECTED
    pooled = max(pooled, int((expected < MIN_EXPECTED).sum()))
    small, large = order[:pooled], order[pooled:]
    observed = torch.cat([counts[large], counts[small].sum()[None]])
    expected = torch.cat([expected[large], expected[small].sum()[None]])
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = observed.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


def _sample_counts(model, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of the first two new tokens [V, V] and of the third [V] over N sampled generations."""
    joint, third = torch.zeros(VOCAB, VOCAB), torch.zeros(VOCAB)
    torch.manual_seed(1)
    for _ in range(N):
        new = model.generate(
            PROMPT, attention_mask=torch.ones_like(PROMPT), do_sample=True, top_k=0, max_new_tokens=NEW, **kwargs
        )[0, PROMPT.size(1) :]
        assert new.numel() == NEW
        joint[new[0], new[1]] += 1
        third[new[2]] += 1
    return joint, third


def test_chi_square_p_value_accepts_the_truth_and_rejects_another_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01])
    draws = torch.multinomial(probs, 2000, replacement=True, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=5)
    assert chi_square_p_value(counts, probs) > ALPHA
    assert chi_square_p_value(counts, torch.tensor([0.4, 0.4, 0.15, 0.04, 0.01])) < ALPHA


@pytest.fixture
def one_thread():
    """The model is tiny: one thread per op is faster than two, and much faster on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@torch.no_grad()
def test_sampled_assisted_generation_follows_the_models_distribution(one_thread):
    from snlp_compile import snlp_assistant

    model = _model()
    assistant = snlp_assistant(model, {"iters": 1, "inner": "eager", "fallback": "error"})
    p_joint, p_third = _distributions(model)
    q_joint, _ = _distributions(assistant)
    assert 0.5 * (p_joint - q_joint).abs().sum() > 0.3  # the drafts really differ from the model

    for kwargs in ({}, {"assistant_model": assistant}):  # the plain control, then assisted
        joint, third = _sample_counts(model, **kwargs)
        assert chi_square_p_value(joint, p_joint) > ALPHA, kwargs
        assert chi_square_p_value(third, p_third) > ALPHA, kwargs
    assert chi_square_p_value(joint, q_joint) < ALPHA  # the assisted samples are not the drafter's
