"""Where the time goes: torch.profiler over the best sequential baseline and SNLP variants.

For one preset and one question (a full-sequence forward or one decode step), each variant is
compiled and checked exactly as the benchmark scripts do, warmed up, then profiled over --steps
calls. Printed per variant: wall time per call (back-to-back calls) against the host time to issue
one (no synchronisation; equal to the wall time when the host, not the GPU, is the bottleneck), GPU
time per call, kernels per call, the time per kernel category (GEMM, attention, Triton-generated,
copies, other) and the top kernels. Writes
OUT/profile_<question>_<preset>.json and, with --trace, a Chrome trace per variant (https://ui.perfetto.dev).

    PYTHONPATH=. python3 benchmarks/profile_gpu.py --question decode --preset d20 --out out
    PYTHONPATH=. python3 benchmarks/profile_gpu.py --question forward --preset paper-0.5b --snlp 24:1 24:1:cg
    PYTHONPATH=. python3 benchmarks/profile_gpu.py --smoke --out /tmp/smoke   # tiny, CPU (CPU ops)
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_decode import DecodeProblem
from benchmarks.bench_forward import ForwardProblem
from benchmarks.harness import Bench, add_common_args, setup_logging
from benchmarks.report import format_table, write_json
from benchmarks.timing import run_steps, synchronize
from benchmarks.variants import (
    Variant,
    baseline_variants,
    build_model,
    compile_limits,
    compile_variant,
    snlp_variant,
    with_option,
)

# Kernel name substrings per category, checked in this order (the first match wins).
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "attn")),
    (
        "gemm",
        (
            "gemm",
            "gemv",
            "triton_tem",
            "cutlass",
            "nvjet",
            "sm90_",
            "sm80_",
            "xmma",
            "cublas",
            "bmm",
            "addmm",
            "matmul",
            " mm",
        ),
    ),
    ("copy", ("copy", "memcpy", "memset", "cat", "index_put", "scatter")),
    ("triton", ("triton",)),
)


def category(name: str) -> str:
    lowered = name.lower()
    for label, needles in CATEGORIES:
        if any(n in lowered for n in needles):
            return label
    return "other"


def parse_snlp(spec: str, n_layer: int, inner: str) -> Variant:
    """'N_PAR:ITERS[:FUSE][:cg][:gemv]' -> the SNLP variant (blocks 1, init h0)."""
    parts = spec.split(":")
    flags = {p for p in parts if p in ("cg", "gemv")}
    numbers = [p for p in parts if p not in flags]
    if not 2 <= len(numbers) <= 3 or not all(p.isdigit() for p in numbers):
        raise ValueError(f"--snlp entries are N_PAR:ITERS[:FUSE][:cg][:gemv], got {spec!r}")
    n_par, iters, fuse = int(numbers[0]), int(numbers[1]), int(numbers[2]) if len(numbers) == 3 else 1
    variant = snlp_variant(n_layer, dict(n_par=n_par, iters=iters, fuse=fuse), "cg" in flags, inner)
    return with_option(variant, "gemv", "gemv") if "gemv" in flags else variant


def kernel_summary(prof: profile, steps: int, device: torch.device, top: int) -> dict[str, Any]:
    """Per call: device time, kernel count, time per category and the `top` most expensive kernels."""
    use_device = device.type == "cuda"
    events = [e for e in prof.key_averages() if (e.self_device_time_total if use_device else e.self_cpu_time_total) > 0]
    if use_device:
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]

    def micros(e: Any) -> float:
        return (e.self_device_time_total if use_device else e.self_cpu_time_total) / steps

    by_category: dict[str, float] = defaultdict(float)
    for e in events:
        by_category[category(e.key)] += micros(e)
    ranked = sorted(events, key=micros, reverse=True)
    return {
        "clock": "GPU" if use_device else "CPU",
        "us_per_call": sum(micros(e) for e in events),
        "kernels_per_call": sum(e.count for e in events) / steps,
        "by_category_us": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "top": [
            {
                "name": e.key[:120],
                "us_per_call": micros(e),
                "calls_per_step": e.count / steps,
                "category": category(e.key),
            }
            for e in ranked[:top]
        ],
    }


def host_and_wall_us(step: Any, device: torch.device, calls: int) -> tuple[float, float]:
    """(host us to issue one call, wall us per call) over `calls` back-to-back calls."""
    synchronize(device)
    start = time.perf_counter()
    run_steps(step, calls)
    issued = time.perf_counter()
    synchronize(device)
    end = time.perf_counter()
    return (issued - start) / calls * 1e6, (end - start) / calls * 1e6


def profile_variant(model: torch.nn.Module, variant: Variant, problem: Any, bench: Bench, steps: int) -> dict:
    """Compile and check the variant as the benchmarks do, warm it up, time it, then profile `steps` calls."""
    with compile_limits():
        fn = compile_variant(model, variant, bench.args.skip_module_guards)
        rel, top1 = problem.check(fn)
        step = problem.step(fn)
        run_steps(step, 5)
        host_us, wall_us = host_and_wall_us(step, bench.device, steps)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            run_steps(step, steps)
            synchronize(bench.device)
    if bench.args.trace:
        name = variant.name.replace(" ", "_").replace("+", "")
        prof.export_chrome_trace(str(bench.args.out / f"trace_{bench.question}_{name}.json"))
    summary = kernel_summary(prof, steps, bench.device, bench.args.top)
    torch._dynamo.reset()
    return {"variant": variant.name, "rel_err": rel, "top1": top1, "wall_us": wall_us, "host_us": host_us, **summary}


def print_summary(result: dict) -> None:
    cats = ", ".join(f"{k} {v:.0f}" for k, v in result["by_category_us"].items())
    print(
        f"\n== {result['variant']}: {result['wall_us']:.0f} us wall per call (host {result['host_us']:.0f} us to "
        f"issue it), {result['us_per_call']:.0f} us of {result['clock']} self time per call, "
        f"{result['kernels_per_call']:.0f} kernels per call (rel err {result['rel_err']:.2e}); by category (us): {cats}"
    )
    rows = [[f"{k['us_per_call']:.1f}", f"{k['calls_per_step']:.0f}", k["category"], k["name"]] for k in result["top"]]
    print(format_table(["us/call", "n/call", "category", "kernel"], rows))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--question", choices=("forward", "decode"), default="decode")
    parser.add_argument("--snlp", nargs="+", default=None, help="SNLP variants N_PAR:ITERS[:FUSE][:cg][:gemv]")
    parser.add_argument("--seq-len", type=int, default=2048, help="forward: tokens per sequence")
    parser.add_argument("--context", type=int, default=512, help="decode: prompt tokens in the cache")
    parser.add_argument("--steps", type=int, default=20, help="profiled calls per variant")
    parser.add_argument("--top", type=int, default=15, help="kernels listed per variant")
    parser.add_argument("--trace", action="store_true", help="also write a Chrome trace per variant")
    parser.add_argument(
        "--baselines",
        nargs="*",
        choices=("eager", "inductor+cg", "inductor", "dynamo-eager"),
        default=None,
        help="sequential variants profiled first (default: inductor+cg, inductor; dynamo-eager on CPU; no value: none)",
    )
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.max_autotune or args.gemv:
        parser.error("--max-autotune / --gemv: name the variants instead (--snlp N_PAR:ITERS[:FUSE][:cg][:gemv])")
    return args


@torch.no_grad()
def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    bench = Bench(f"profile_{args.question}", args, default_cg=True)
    preset = bench.presets[0]
    model = build_model(preset, bench.device, bench.dtype, args.seed)
    n_layer = model.config.n_layer
    if args.smoke:
        args.seq_len, args.context, args.steps = 32, 16, 2
    if args.question == "forward":
        problem = ForwardProblem(model, bench, args.batch[0], args.seq_len)
    else:
        problem = DecodeProblem(model, bench, args.batch[0], args.context, args.context + 5 + 2 * args.steps, 2)
    specs = args.snlp or [f"{n_layer}:1:cg", f"{n_layer}:1"]
    base = baseline_variants(bench.device)
    wanted = ("inductor+cg", "inductor", "dynamo-eager") if args.baselines is None else args.baselines
    variants = [v for v in base if v.name in wanted]
    variants += [parse_snlp(s, n_layer, bench.inner) for s in specs]
    results = []
    for variant in variants:
        result = profile_variant(model, variant, problem, bench, args.steps)
        print_summary(result)
        results.append(result)
        doc = {"env": bench.env, "preset": preset, "question": args.question, "settings": bench.settings}
        write_json(args.out / f"profile_{args.question}_{preset}.json", {**doc, "results": results})
    return results


if __name__ == "__main__":
    setup_logging()
    main()
