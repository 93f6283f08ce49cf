"""The example scripts (train_char_lm, eval_snlp) and the speculative benchmark on a tiny run."""

import json

import pytest
import torch

from tests.helpers.examples import load_example

train_char_lm = load_example("train_char_lm")  # first: eval_snlp imports it by name
eval_snlp = load_example("eval_snlp")


def test_example_scripts_smoke(tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("".join(f"line {i}: to be or not to be.\n" for i in range(300)))
    tiny_run = ["--preset", "tiny", "--n-layer", "2", "--data", str(data), "--batch", "2", "--seq", "16"]
    schedule = ["--steps", "4", "--eval-every", "2", "--eval-batches", "1"]
    regulariser = ["--reg-weight", "0.5", "--reg-n-par", "2"]
    metrics = train_char_lm.main([*tiny_run, *schedule, *regulariser, "--out", str(tmp_path / "run")])
    assert [v["step"] for v in metrics["val"]] == [2, 4] and metrics["best_step"] in (2, 4)
    assert all(t["reg"] > 0 for t in metrics["train"])
    compiled = train_char_lm.main([*tiny_run, *schedule, *regulariser, "--compile", "--out", str(tmp_path / "c")])
    for eager, inductor in zip(metrics["train"], compiled["train"], strict=True):  # same run through inductor
        assert inductor["ce"] == pytest.approx(eager["ce"], rel=1e-3) and inductor["reg"] == pytest.approx(
            eager["reg"], rel=1e-3
        )
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["best_val"] == metrics["best_val"]
    report = eval_snlp.main(
        [str(tmp_path / "run" / "model.pt"), "--data", str(data), "--batch", "2", "--seq", "16"]
        + ["--eval-batches", "1", "--out", str(tmp_path / "eval")]
    )
    results = report["checkpoints"]["run"]["results"]
    assert set(results) == {"sequential", "npar1 K1", "npar1 K2", "npar2 K1", "npar2 K2", "npar2 K4", "npar2 F2 K2"}
    assert results["npar2 K1"]["ppl"] != pytest.approx(results["sequential"]["ppl"], rel=1e-4)
    for exact in ("npar1 K1", "npar2 K2", "npar2 K4"):
        assert results[exact]["ppl"] == pytest.approx(results["sequential"]["ppl"], rel=1e-4)
        assert results[exact]["top1_agreement"] == 1.0
    assert (tmp_path / "eval" / "frontier.png").stat().st_size > 0

    from benchmarks import bench_speculative

    doc = bench_speculative.main(  # the checkpoint drafts for itself
        ["--smoke", "--checkpoint", str(tmp_path / "run" / "model.pt"), "--prompt-data", str(data)]
        + ["--context", "6", "--new-tokens", "5", "--n-par", "1", "--draft-len", "2", "--out", str(tmp_path / "spec")]
    )
    assert all(r["exact"] == "same" for r in doc["rows"] if r["mode"] == "speculative")
    assert doc["rows"][0]["weights"].endswith("model.pt") and doc["rows"][0]["n_par"] == 1


def test_interrupted_training_keeps_its_metrics_and_best_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C (or run_training_gpu.sh's time limit, a SIGINT) mid-run: curves and best checkpoint stay."""
    data = tmp_path / "text.txt"
    data.write_text("".join(f"line {i}: to be or not to be.\n" for i in range(300)))
    batches = iter(range(3))
    draw = train_char_lm.random_batch

    def three_batches_then_interrupt(*args):
        if next(batches, None) is None:
            raise KeyboardInterrupt
        return draw(*args)

    monkeypatch.setattr(train_char_lm, "random_batch", three_batches_then_interrupt)
    args = ["--preset", "tiny", "--n-layer", "2", "--data", str(data), "--batch", "2", "--seq", "16", "--steps", "8"]
    metrics = train_char_lm.main([*args, "--eval-every", "2", "--eval-batches", "1", "--out", str(tmp_path / "run")])
    assert metrics["interrupted"] and [t["step"] for t in metrics["train"]] == [1, 2, 3]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["best_step"] == 2
    assert torch.load(tmp_path / "run" / "model.pt", weights_only=True)["step"] == 2
