"""TuneResult.plot writes the speed-quality plot, for an SNLP choice and for the sequential fallback."""

import pytest
import torch

from snlp_compile import tune
from tests.tuning.synthetic import TableMeasure

SPACE = {"n_seq": [0, 2], "iters": [1, 2], "init": ["h0", "batch_fwd"]}
DATA = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "sequential, spread, chosen", [((2.0, 10.0), (0.95, 1.2), True), ((2.0, 10.0), (1.2, 1.5), False)]
)
def test_plot_writes_a_file(tiny_gpt, tmp_path, sequential, spread, chosen):
    result = tune(tiny_gpt, DATA, 0.1, space=SPACE, measure=TableMeasure(sequential, spread), progress=False)
    assert (result.config is not None) == chosen
    for name, magic in (("frontier.png", b"\x89PNG"), ("frontier.svg", b"<?xml")):
        path = tmp_path / name
        result.plot(path)
        assert path.read_bytes().startswith(magic)
    svg = (tmp_path / "frontier.svg").read_text()
    assert "chosen" in svg and "budget 0.1: loss &lt;= 2.2000" in svg
