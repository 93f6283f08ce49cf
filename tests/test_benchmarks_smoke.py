"""Smoke runs of the benchmark scripts on CPU (tiny preset, eager inner compiler): the JSONs hold the
expected rows, SNLP with iters >= layers matches the sequential model, and the plots are written."""

import argparse
import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from snlp_compile.models import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ["eager", "dynamo-eager"]


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()  # smoke runs set one thread
    try:
        for script, grid in (("bench_forward", "headline"), ("bench_decode", "minimal")):
            importlib.import_module(f"benchmarks.{script}").main(["--smoke", "--grid", grid, "--out", str(out)])
        from benchmarks import frontier

        frontier.main(["--inputs", str(out / "forward.json"), str(out / "decode.json"), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize(
    "question, snlp",
    [
        ("forward", ["snlp p4 F1 K1", "snlp p4 F1 K4 check", "snlp p2 F2 K1", "snlp p4 F1 K2 B2"]),
        ("decode", ["snlp p4 F1 K1", "snlp p4 F1 K4 check"]),
    ],
)
def test_rows(smoke_dir: Path, question: str, snlp: list[str]) -> None:
    doc = json.loads((smoke_dir / f"{question}.json").read_text())
    assert doc["question"] == question and doc["env"]["torch"]
    rows = {r["variant"]: r for r in doc["rows"]}
    assert list(rows) == BASELINES + snlp
    assert all(r["preset"] == "tiny" and r["batch"] == 1 for r in rows.values())
    for name, row in rows.items():
        assert row["status"] == ("checked" if name.endswith("check") else "ok"), row
        if row["status"] == "ok":
            assert row["ms"] > 0 and row["tokens_per_s"] > 0
            assert set(row["speedup"]) == set(BASELINES) and row["best_baseline"] in BASELINES
    assert rows["eager"]["rel_err"] == 0.0
    assert rows["snlp p4 F1 K1"]["rel_err"] > 1e-3  # one iteration is an approximation: recorded, not checked
    assert (smoke_dir / f"{question}.png").stat().st_size > 0


def test_exact_snlp_matches_sequential(smoke_dir: Path) -> None:
    for question in ("forward", "decode"):
        rows = json.loads((smoke_dir / f"{question}.json").read_text())["rows"]
        exact = [r for r in rows if r["kind"] == "snlp" and r["exact"]]
        assert exact and all(r["rel_err"] < 1e-4 and r["top1"] == 1.0 for r in exact)
        assert all(r["options"]["fallback"] == "error" for r in rows if r["kind"] == "snlp")


def test_frontier(smoke_dir: Path) -> None:
    assert (smoke_dir / "frontier.png").stat().st_size > 0
    text = (smoke_dir / "results.md").read_text()
    assert "### forward" in text and "### decode" in text and "snlp p4 F1 K1" in text


def test_speculative_benchmark_smoke(tmp_path):
    from benchmarks import bench_speculative

    doc = bench_speculative.main(["--smoke", "--out", str(tmp_path), "--draft-len", "2"])
    modes = [r["mode"] for r in doc["rows"]]
    assert modes == ["sequential", "snlp", "speculative"]
    speculative = doc["rows"][-1]
    assert speculative["exact"] == "same" and 0.0 <= speculative["acceptance"] <= 1.0
    assert (tmp_path / "speculative.json").exists()


def test_speculative_divergence_names_the_first_differing_token_and_its_logit_gap():
    from benchmarks.bench_speculative import divergence

    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny")).eval()
    reference = torch.randint(0, 64, (1, 9))
    assert divergence(model, reference, reference.clone(), 5) == "same"
    other = reference.clone()
    other[0, 7] = (other[0, 7] + 1) % 64
    logits = model(reference[:, :7])[0, -1].topk(2).values
    gap = f"{float(logits[0] - logits[1]):.2g}"
    assert divergence(model, reference, other, 5) == f"differs from new token 2 (top-2 logit gap {gap})"


def test_gpu_variant_list_with_max_autotune_and_gemv(tmp_path):
    """The GPU variant list (built on any machine): baselines in priority order, the headline spec with and
    without CUDA graphs, with --max-autotune the autotuned baseline and autotuned timed SNLP variants, and with
    --max-autotune baseline the autotuned baseline alone."""
    from benchmarks import harness

    parser = argparse.ArgumentParser()
    harness.add_common_args(parser)
    names = {}
    for flag in ([], ["--max-autotune"], ["--max-autotune", "baseline"]):
        args = parser.parse_args(["--grid", "minimal", "--out", str(tmp_path), *flag])
        bench = harness.Bench("decode", args, default_cg=True)
        bench.device = torch.device("cuda")
        variants = bench.variants("d20", 20)
        names[" ".join(flag)] = [v.name for v in variants]
        tuned = flag == ["--max-autotune"]
        for v in variants:
            assert v.options.get("max_autotune", False) == (tuned and v.kind == "snlp" and v.timed)
    assert names[""] == [
        "eager", "inductor+cg", "snlp p20 F1 K1 +cg", "snlp p20 F1 K1", "snlp p20 F1 K20 check", "inductor"
    ]  # fmt: skip
    assert names["--max-autotune"] == [
        "eager", "inductor+cg", "snlp p20 F1 K1 +cg +at", "snlp p20 F1 K1 +at", "snlp p20 F1 K20 check",
        "inductor+cg+at", "inductor",
    ]  # fmt: skip
    assert names["--max-autotune baseline"] == [
        "eager", "inductor+cg", "snlp p20 F1 K1 +cg", "snlp p20 F1 K1", "snlp p20 F1 K20 check",
        "inductor+cg+at", "inductor",
    ]  # fmt: skip
    args = parser.parse_args(["--grid", "minimal", "--out", str(tmp_path), "--gemv"])
    bench = harness.Bench("decode", args, default_cg=True)
    gemv = [v for v in bench.variants("d20", 20) if v.options.get("gemv")]
    assert [v.name for v in gemv] == ["snlp p20 F1 K1 gemv"]  # CPU: no CUDA-graph variant


@pytest.mark.parametrize("question", ["decode", "forward"])
def test_profile_smoke(tmp_path, question):
    from benchmarks import profile_gpu as profile

    results = profile.main(["--smoke", "--question", question, "--snlp", "4:1", "4:1:gemv", "--out", str(tmp_path)])
    assert [r["variant"] for r in results] == ["dynamo-eager", "snlp p4 F1 K1", "snlp p4 F1 K1 gemv"]
    for r in results:
        assert r["clock"] == "CPU" and r["us_per_call"] > 0 and r["top"] and sum(r["by_category_us"].values()) > 0
    doc = json.loads((tmp_path / f"profile_{question}_tiny.json").read_text())
    assert len(doc["results"]) == 3
    assert profile.category("nvjet_sm90_tst_64x8_64x16_4x1_v_bz_TNT") == "gemm"
    assert profile.category("triton_poi_fused_copy__permute_47") == "copy"
    assert profile.category("_stacked_gemv_kernel") == profile.category("triton_tem_fused_mm_0") == "gemm"


def test_kernel_benchmarks_list_every_decode_shape_and_need_a_gpu():
    """bench_gemv's shapes are each preset's decode linears (q, k and v as siblings of one launch, for
    the stack and one layer, and the LM head); both kernel benchmarks refuse to run without CUDA."""
    from benchmarks.bench_gemv import shapes as decode_shapes

    shapes = decode_shapes("paper-0.5b", 24)
    assert [(r["linear"], r["layers"]) for r in shapes] == [
        *[(name, layers) for layers in (24, 1) for name in ("q+k+v", "o", "mlp in", "mlp out")],
        ("lm head", 1),
    ]
    assert shapes[0]["n"] == [640, 640, 640] and shapes[3]["k"] == 2560 and shapes[-1]["n"] == [65536]
    if torch.cuda.is_available():
        return
    for script in ("bench_gemv.py", "bench_decode_attention.py"):
        done = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / script)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert done.returncode == 2 and "needs a GPU" in done.stderr


def test_kernel_sweeps_skip_configs_that_cannot_launch_and_take_the_headline_stack():
    from benchmarks import grids, report, timing

    def time_us(config: int) -> float:
        if config == 2:
            raise RuntimeError("out of resource: shared memory")
        return {1: 5.0, 3: 4.0}[config]

    assert timing.best_launch_config(time_us, [1, 2, 3]) == (4.0, 3)
    row = timing.launch_sweep(lambda tiles: float(sum(tiles)), [(64, 4), (32, 2)])
    assert row == {"best_us": 34.0, "best_tiles": [32, 2]}
    assert report.sweep_cells(row) == ["34.00", "(32, 2)"] and len(report.SWEEP_HEADERS) == 2
    table = report.kernel_table([{**row, "name": "q"}], ["name"], lambda r: [r["name"]], sweep=True).splitlines()
    assert table[0].split() == ["name", "best", "us", "best", "tiles"]
    assert table[2].split() == ["q", "34.00", "(32,", "2)"]
    assert report.kernel_table([row], ["us"], lambda r: ["1"], sweep=False).split() == ["us", "--", "1"]
    with pytest.raises(RuntimeError, match="none of the 1 launch configs ran"):
        timing.best_launch_config(time_us, [2])
    assert [grids.headline_n_par(p) for p in ("d20", "paper-0.5b", "char")] == [20, 24, 8]


def test_eager_interleaved_smoke(tmp_path):
    """Alternating rounds (eager first in even rounds), one paired ratio per round, pooled and paired
    summaries, the JSON and the plot; bad arguments are refused with the valid range."""
    from benchmarks import bench_eager_interleaved as bench

    threads = torch.get_num_threads()
    try:
        doc = bench.main(["--smoke", "--rounds", "3", "--calls", "2", "--warmup", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    rounds = doc["rounds"]
    assert [r["first"] for r in rounds] == ["eager", "snlp", "eager"]
    for r in rounds:
        assert len(r["eager_times"]) == len(r["snlp_times"]) == 2
        assert r["ratio"] == pytest.approx(r["eager_ms"] / r["snlp_ms"])
    summary = doc["summary"]
    assert summary["ratio_p10"] <= summary["ratio_median"] <= summary["ratio_p90"]
    assert doc["settings"]["options"]["inner"] == "eager" and doc["settings"]["options"]["fallback"] == "error"
    assert doc["quality"]["rel_err"] > 1e-3  # K 1 on the tiny preset: an approximation, recorded
    assert json.loads((tmp_path / "eager_interleaved.json").read_text())["summary"] == summary
    assert (tmp_path / "eager_interleaved.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--rounds", "0", "--out", str(tmp_path)])


def test_dynamo_limits_are_raised_only_while_a_variant_runs(tmp_path):
    """Building a Bench leaves dynamo's recompile limits alone; compile_limits raises them for one run and
    restores them after, also when the run fails."""
    from benchmarks import harness, variants

    config = torch._dynamo.config
    before = (config.recompile_limit, config.accumulated_recompile_limit)
    parser = argparse.ArgumentParser()
    harness.add_common_args(parser)
    harness.Bench("decode", parser.parse_args(["--out", str(tmp_path)]), default_cg=True)
    assert (config.recompile_limit, config.accumulated_recompile_limit) == before
    with pytest.raises(RuntimeError, match="inside"), variants.compile_limits():
        assert (config.recompile_limit, config.accumulated_recompile_limit) == (64, 512)
        raise RuntimeError("inside")
    assert (config.recompile_limit, config.accumulated_recompile_limit) == before


def test_plot_and_report_import_no_harness():
    """report imports no benchmark module and plot only report, so the harness imports both without a cycle."""
    for name, allowed in (("report", set()), ("plot", {"benchmarks.report"})):
        tree = ast.parse((ROOT / "benchmarks" / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert {m for m in imported if m.startswith("benchmarks")} == allowed, name


def test_checkpoint_parts_round_trip(tmp_path):
    """split -> join gives the checkpoint back with its floating tensors in bf16; a changed part is refused."""
    from benchmarks.checkpoint_parts import join, main, split

    model = GPT(GPTConfig.preset("tiny"))
    checkpoint = tmp_path / "run" / "model.pt"
    checkpoint.parent.mkdir()
    torch.save(dict(model="gpt", config=dict(vars(model.config)), state_dict=model.state_dict(), step=3), checkpoint)
    parts = split(checkpoint, tmp_path / "parts", max_mib=0.05)
    assert len(parts) > 2 and all(p.stat().st_size <= 0.05 * 2**20 for p in parts)
    main(["join", str(tmp_path / "parts"), str(tmp_path / "back" / "model.pt")])
    back = torch.load(tmp_path / "back" / "model.pt", weights_only=True)
    assert back["step"] == 3 and back["config"] == dict(vars(model.config))
    for name, tensor in model.state_dict().items():
        assert back["state_dict"][name].dtype == torch.bfloat16
        assert torch.equal(back["state_dict"][name], tensor.to(torch.bfloat16))
    parts[1].write_bytes(parts[1].read_bytes()[:-1])
    with pytest.raises(ValueError, match="do not add up to the checkpoint"):
        join(tmp_path / "parts", tmp_path / "again.pt")
    with pytest.raises(ValueError, match="holds no model.pt.partNN"):
        join(tmp_path, tmp_path / "again.pt")
    with pytest.raises(ValueError, match="max_mib must be > 0"):
        split(checkpoint, tmp_path / "none", max_mib=0)
