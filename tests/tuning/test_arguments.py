"""tune rejects bad arguments with errors that name the argument and what it must be."""

import pytest
import torch

from snlp_compile import tune
from tests.tuning.synthetic import TableMeasure

DATA = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(budget=-0.1), ValueError, "budget must be a finite number >= 0"),
        (dict(budget=float("nan")), ValueError, "budget must be a finite number >= 0"),
        (dict(budget=True), ValueError, "budget must be a finite number >= 0"),
        (dict(budget="0.1"), ValueError, "budget must be a finite number >= 0"),
        (dict(data=DATA.float()), ValueError, r"data must hold token ids as torch.long"),
        (dict(data=DATA[0]), ValueError, r"data must have shape \[N, T\] with N >= 1 and T >= 2, got \[16\]"),
        (dict(data=DATA[:, :1]), ValueError, r"T >= 2, got \[2, 1\]"),
        (dict(data=DATA.tolist()), TypeError, "data must be a LongTensor"),
        (dict(data=DATA - 100), ValueError, "data holds negative token ids"),
        (dict(data=DATA + 64), ValueError, "data holds token id .* the model's logits have only 64 entries"),
        (dict(data=None, inputs=DATA + 64), ValueError, "inputs holds token id"),
        (dict(data=DATA, inputs=DATA), ValueError, "pass data .* or inputs .*, not both"),
        (dict(space={"depth": [1]}), ValueError, r"unknown space axes \['depth'\]"),
        (dict(space={"iters": []}), ValueError, r"space\['iters'\] must be a non-empty list"),
        (dict(space={"init": "h0"}), ValueError, r"space\['init'\] must be a non-empty list"),
        (dict(space={"iters": [0]}), ValueError, "space: SNLPConfig.iters must be an integer >= 1, got 0"),
        (dict(space=[{"init": "zeros"}]), ValueError, "space: SNLPConfig.init must be one of"),
        (dict(space=[]), ValueError, "space must be a dict"),
        (dict(space=[("iters", 1)]), ValueError, "must hold settings as dicts"),
        (dict(space={"n_seq": [4, 9]}), ValueError, "no setting of the space fits the layer stack .*4 layers"),
        (dict(base={"iters": 0}), ValueError, "SNLPConfig.iters must be an integer >= 1"),
        (dict(base={"speed": "max"}), ValueError, r"unknown SNLP option\(s\) \['speed'\]"),
        (dict(warmup=0), ValueError, "warmup must be an integer >= 1, got 0"),
        (dict(reps=1.5), ValueError, "reps must be an integer >= 1"),
        (dict(measure=object()), TypeError, r"measure must have methods quality\(config\) and time_ms\(config\)"),
    ],
)
def test_bad_arguments(tiny_gpt, kwargs, error, match):
    kwargs = dict(data=DATA, measure=TableMeasure((2.0, 1.0), (1.0, 1.0)), progress=False) | kwargs
    with pytest.raises(error, match=match):
        tune(tiny_gpt, **kwargs)


class DictOutput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(64, 8)

    def forward(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.embedding(idx)}


def test_bad_models():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        tune(lambda idx: idx, DATA)
    with pytest.raises(ValueError, match="the model has no parameters"):
        tune(torch.nn.Identity(), DATA)
    with pytest.raises(TypeError, match="the model must return logits .* got dict"):
        tune(DictOutput(), DATA)
    with pytest.raises(ValueError, match="the compiler finds no layer stack in this model"):
        tune(torch.nn.Embedding(64, 64), DATA, progress=False)
