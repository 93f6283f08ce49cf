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
        + ["--eval-batches", "1", "--tune", "0.5", "--tune-rows", "2", "--out", str(tmp_path / "eval")]
    )
    results = report["checkpoints"]["run"]["results"]
    tuned = report["tune"]["run"]["0.5"]
    assert tuned["settings"] > 0 and tuned["speedup"] >= 1.0 and (tuned["config"] is None) == bool(tuned["reason"])
    assert (tmp_path / "eval" / "tune_run_0.5.png").stat().st_size > 0
    # n_par L/4 .. L = 1, 2; K 1, 2, 4 up to the useful iterations; fuse 2 where n_par >= 2
    assert set(results) == {"sequential", "npar1 K1", "npar2 K1", "npar2 K2", "npar2 F2 K1"}
    assert results["npar2 K1"]["ppl"] != pytest.approx(results["sequential"]["ppl"], rel=1e-4)
    for exact in ("npar1 K1", "npar2 K2"):
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


def byte_files(tmp_path):
    """A training and a validation file of UTF-8 code, with bytes >= 128."""
    lines = [f"def f{i}(x):  # é → λ {i}\n    return x * {i}\n" for i in range(200)]
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("".join(lines[:160]), encoding="utf-8")
    val.write_text("".join(lines[160:]), encoding="utf-8")
    assert max(train.read_bytes()) >= 128
    return train, val


def tiny_byte_run(tmp_path, steps: int) -> list[str]:
    """train_char_lm flags: a 4-layer tiny GPT, vocab 256, on byte_files."""
    train, val = byte_files(tmp_path)
    model = ["--preset", "tiny", "--n-layer", "4", "--n-embd", "32", "--n-head", "2", "--vocab", "256"]
    data = ["--data", str(train), "--val-data", str(val), "--batch", "2", "--seq", "16", "--eval-batches", "1"]
    return [*model, *data, "--steps", str(steps), "--eval-every", "2"]


def test_byte_level_training_resumes_where_the_time_limit_stopped_it(tmp_path):
    """Vocab 256, a separate validation file, and a run cut by --time-limit after each step and resumed
    (same command) that trains exactly as one uninterrupted run: same batches, updates and regulariser
    warm-up; a finished run resumes to nothing, and other flags are refused."""
    run = [*tiny_byte_run(tmp_path, 2), "--reg-weight", "0.5", "--reg-n-par", "2", "4", "--reg-warmup", "2"]
    with pytest.raises(ValueError, match="--vocab 256"):
        train_char_lm.main([*run, "--vocab", "128", "--out", str(tmp_path / "ascii")])
    whole = train_char_lm.main([*run, "--out", str(tmp_path / "whole")])
    cut = [*run, "--resume", "--time-limit", "1e-9", "--out", str(tmp_path / "cut")]
    first = train_char_lm.main(cut)
    assert first["stopped"] == "time_limit" and [t["step"] for t in first["train"]] == [1]
    assert torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["step"] == 1
    second = train_char_lm.main(cut)
    assert second["stopped"] == "steps" and [v["step"] for v in second["val"]] == [1, 2]
    assert second["train"] == whole["train"] and whole["train"][1]["reg"] > 0  # the warm-up step count resumed
    assert second["val"][-1]["loss"] == whole["val"][-1]["loss"]
    states = [torch.load(tmp_path / name / "last.pt", weights_only=True)["state_dict"] for name in ("whole", "cut")]
    assert states[0].keys() == states[1].keys() and all(torch.equal(v, states[1][k]) for k, v in states[0].items())
    assert train_char_lm.main(cut)["train"] == second["train"]  # finished: nothing left to train
    with pytest.raises(ValueError, match="--lr 0.001 \\(now 0.01\\)"):
        train_char_lm.main([*cut, "--lr", "0.01"])


def test_training_stops_after_patience_evaluations_without_a_new_best(tmp_path):
    metrics = train_char_lm.main([*tiny_byte_run(tmp_path, 10), "--lr", "0", "--patience", "1", "--out", str(tmp_path)])
    assert metrics["stopped"] == "patience" and [v["step"] for v in metrics["val"]] == [2, 4]
    assert metrics["best_step"] == 2 and len(metrics["train"]) == 4  # lr 0: the loss at step 4 is no new best


def test_paper_form_of_the_regulariser(tmp_path):
    """--reg-form paper: the last parallel layer run on the block input (IDN, stride 0), scored
    against the sequential trace; K = 1 only."""
    run = [*tiny_byte_run(tmp_path, 1), "--reg-weight", "1", "--reg-form", "paper", "--reg-n-par", "4"]
    assert train_char_lm.main([*run, "--out", str(tmp_path / "paper")])["train"][0]["reg"] > 0
    with pytest.raises(SystemExit):
        train_char_lm.main([*run, "--reg-iters", "1", "2", "--out", str(tmp_path / "k2")])


def test_iteration_counts_per_n_par_from_the_command_line(tmp_path):
    """--reg-iters N:K pairs regularise each n_par at its own K; mixing forms or non-integers is refused."""
    assert train_char_lm.reg_iters(["2:1", "4:2", "4:3"]) == {2: [1], 4: [2, 3]}
    assert train_char_lm.reg_iters(["1", "2"]) == [1, 2]
    run = [*tiny_byte_run(tmp_path, 1), "--reg-weight", "1", "--reg-n-par", "2", "4", "--reg-iters", "2:1", "4:2"]
    assert train_char_lm.main([*run, "--out", str(tmp_path / "pairs")])["train"][0]["reg"] > 0
    for bad in (["1", "4:2"], ["4:x"], ["4:2:1"]):
        with pytest.raises(SystemExit):
            train_char_lm.main([*run[:-2], *bad, "--out", str(tmp_path / "bad")])


@pytest.mark.slow
def test_eval_grid_and_speed_on_cpu(tmp_path, monkeypatch):
    """The grid on a separate validation file, and --speed with tiny lengths: the eager baseline and
    SNLP decode / forward timed on the checkpoint's weights; the exact SNLP decode (K = n_par) keeps
    every greedy token; --time-limit skips SNLP variants, never the baseline; an interrupt (SIGINT)
    keeps what was measured."""
    train_char_lm.main([*tiny_byte_run(tmp_path, 2), "--out", str(tmp_path / "run")])
    common = [str(tmp_path / "run" / "model.pt"), "--val-data", str(tmp_path / "val.txt"), "--batch", "2"]
    common += ["--seq", "16", "--eval-batches", "1", "--speed", "--prompt-len", "8", "--new-tokens", "6"]
    common += ["--forward-len", "24", "--decode-reps", "1", "--forward-reps", "2"]
    grid = ["--n-par", "4", "--iters", "1", "4", "--fuse", "1", "--speed-iters", "1", "4"]
    report = eval_snlp.main([*common, *grid, "--out", str(tmp_path / "e")])
    results = report["checkpoints"]["run"]["results"]
    assert set(results) == {"sequential", "npar4 K1", "npar4 K4"}
    assert results["npar4 K4"]["ppl"] == pytest.approx(results["sequential"]["ppl"], rel=1e-4)
    assert all(results[label]["decode_tok_s"] > 0 and results[label]["forward_ms"] > 0 for label in results)
    assert set(report["checkpoints"]["run"]["baselines"]) == {"eager"}
    assert results["sequential"]["decode_x_best"] == 1.0 and results["npar4 K4"]["same_new_tokens"] == 6
    assert report["speed"] == {"skipped": {"run": []}, "errors": {"run": {}}}
    assert "| run | npar4 K1 |" in (tmp_path / "e" / "eval.md").read_text()
    assert (tmp_path / "e" / "frontier.png").stat().st_size > 0
    late = eval_snlp.main(
        [*common, "--n-par", "4", "--iters", "1", "--fuse", "1", "--time-limit", "1e-9", "--out", str(tmp_path)]
    )
    assert late["speed"]["skipped"] == {"run": ["npar4 K1"]}
    assert "decode_tok_s" in late["checkpoints"]["run"]["results"]["sequential"]
    calls = iter(range(1))
    decode_rate = eval_snlp.decode_rate

    def interrupt_after_the_baseline(*args):
        if next(calls, None) is None:
            raise KeyboardInterrupt
        return decode_rate(*args)

    monkeypatch.setattr(eval_snlp, "decode_rate", interrupt_after_the_baseline)
    cut = eval_snlp.main([*common, "--n-par", "4", "--iters", "1", "--fuse", "1", "--out", str(tmp_path / "cut")])
    assert cut["speed"]["skipped"] == {"run": ["npar4 K1"]} and "baselines" in cut["checkpoints"]["run"]
    assert json.loads((tmp_path / "cut" / "eval.json").read_text())["speed"] == cut["speed"]
