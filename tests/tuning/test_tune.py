"""tune end to end on the tiny GPT (CPU, eager inner compiler): with data (loss; a model returning a tuple)
and without (agreement; a model returning the logits)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from snlp_compile import SNLPConfig, TuneResult, tune
from snlp_compile.tuning.model_io import RANDOM_SHAPE, logits_of, random_tokens
from snlp_compile.tuning.result import TIMED

EXACT = {"iters": 4}  # iters = the 4 layers: the sequential model up to rounding
SPACE = [EXACT, {"n_seq": 2, "iters": 1}]


class TupleOutput(nn.Module):
    """A model whose forward returns (logits, hidden-state norm), as many non-Hugging-Face models do."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(idx)
        return logits, logits.norm()


def _check_choice(result: TuneResult) -> None:
    timed = [p for p in result.frontier if p.status == TIMED]
    assert all(p.within_budget and p.ms > 0 for p in timed)
    assert result.baseline.ms > 0
    if result.config is None:
        assert result.reason
    else:
        assert result.chosen.ms == min(p.ms for p in timed) < result.baseline.ms


@pytest.fixture(autouse=True)
def one_thread():
    """Timed calls on a shared CPU: with one thread, no op waits for an OpenMP peer that lost its core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tune_with_data_scores_the_validation_loss(tiny_gpt):
    model = TupleOutput(tiny_gpt).eval()
    data = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = tiny_gpt(data)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), data[:, 1:].flatten()).item()
    result = tune(model, data, budget=0.01, base={"inner": "eager"}, space=SPACE, warmup=1, reps=2, progress=False)
    assert result.metric == "loss"
    assert result.baseline.quality == pytest.approx(loss, rel=1e-6)
    assert result.criterion.threshold == pytest.approx(1.01 * loss, rel=1e-6)
    exact, cheap = result.frontier
    assert exact.config == SNLPConfig(iters=4, inner="eager")
    assert exact.quality == pytest.approx(loss, rel=1e-4) and exact.within_budget and exact.status == TIMED
    assert cheap.quality is not None and cheap.within_budget == (cheap.quality <= result.criterion.threshold)
    _check_choice(result)


def test_tune_without_data_scores_top1_agreement(tiny_gpt):
    inputs = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    result = tune(tiny_gpt, None, budget=0.05, base={"inner": "eager"}, space=SPACE, inputs=inputs, progress=False)
    assert result.metric == "agreement" and result.baseline.quality == 1.0
    assert result.criterion.threshold == pytest.approx(0.95)
    exact, cheap = result.frontier
    assert exact.quality == 1.0 and exact.within_budget
    # The agreement of the cheap setting, measured here on the same inputs.
    compiled = torch.compile(tiny_gpt, backend="snlp", options=dict(n_seq=2, iters=1, inner="eager"))
    with torch.no_grad():
        agreement = (compiled(inputs).argmax(-1) == tiny_gpt(inputs).argmax(-1)).float().mean().item()
    assert cheap.quality == pytest.approx(agreement)
    _check_choice(result)


def test_random_tokens_are_drawn_from_the_vocabulary_read_off_the_logits():
    tokens = random_tokens(64, torch.device("cpu"))
    assert tokens.shape == RANDOM_SHAPE and tokens.dtype == torch.long
    assert tokens.min() >= 0 and tokens.max() < 64 and len(tokens.unique()) > 16
    assert torch.equal(tokens, random_tokens(64, torch.device("cpu")))


def test_logits_of_reads_every_output_kind():
    logits = torch.randn(1, 3, 5)

    class Output:  # a Hugging Face ModelOutput's attribute access
        def __init__(self):
            self.logits = logits

    for output in (logits, (logits, None), [logits], Output()):
        assert logits_of(output) is logits
    with pytest.raises(TypeError, match="must return logits"):
        logits_of({"logits": logits})
