"""tune on a Hugging Face causal LM, whose forward returns an output object with .logits."""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from snlp_compile import SNLPConfig, tune  # noqa: E402
from tests.helpers.huggingface import llama  # noqa: E402


@pytest.mark.slow
def test_tune_reads_hugging_face_logits():
    torch.manual_seed(0)
    model = llama().eval()
    data = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(data).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), data[:, 1:].flatten()).item()
    result = tune(model, data, 0.01, base={"inner": "eager"}, space=[{"iters": 4}], warmup=1, reps=1, progress=False)
    assert result.baseline.quality == pytest.approx(loss, rel=1e-6)
    (exact,) = result.frontier
    assert exact.config == SNLPConfig(iters=4, inner="eager")
    assert exact.quality == pytest.approx(loss, rel=1e-4) and exact.within_budget and exact.ms > 0
