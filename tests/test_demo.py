"""`make demo`'s job: every setting compiles for any stack depth, the last one is exact, bad flags say why."""

import pytest

from snlp_compile import demo


@pytest.mark.parametrize("layers", [2, 3])
def test_demo_runs_at_small_depths_and_its_last_setting_is_exact(layers):
    rows = demo.main(["--layers", str(layers), "--seq-len", "16"])
    assert [row["setting"] for row in rows][-1] == f"iters={layers}"
    assert rows[-1]["rel_err"] < 1e-5 and rows[-1]["top1"] == 1.0
    assert len(rows) == 1 + len(demo.settings(layers))


@pytest.mark.parametrize(
    "flags, message", [(["--layers", "1"], "--layers must be >= 2"), (["--seq-len", "0"], "--seq-len must be in")]
)
def test_demo_rejects_bad_flags(flags, message, capsys):
    with pytest.raises(SystemExit):
        demo.main(flags)
    assert message in capsys.readouterr().err
