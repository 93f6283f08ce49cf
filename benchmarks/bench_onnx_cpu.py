"""onnxruntime on CPU: the SNLP file (all layers in parallel, K Newton iterations) against the sequential
file, both written by `export_onnx(..., decode=True)` from the same random-weight GPT.

The sequential file is the same export without the rewrite (`rewrite=False`: the model as it is, in
the same file layout). Timed per file and intra-op thread count (inter-op 1, every onnxruntime graph
optimisation on), in rounds in which the two files alternate (median of all calls): one decode step
(one new token after a --seq-len-token past, the decode file) and one --seq-len-token forward (the
prefill file: logits and the keys/values). The model's context is raised to hold the past and the
new token (the rotary table only; the weights are the preset's). Quality = relative L2 error and
top-1 agreement of the SNLP logits against the sequential file's (the SNLP decode step reads the SNLP
prefill's keys/values, as in `generate(mode="snlp")`). Writes OUT/onnx_cpu.json (and the .onnx files
under OUT/onnx/).

    PYTHONPATH=. python3 benchmarks/bench_onnx_cpu.py --preset char --out out
    PYTHONPATH=. python3 benchmarks/bench_onnx_cpu.py --smoke --out /tmp/smoke   # tiny, short
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch

from benchmarks.harness import environment, setup_logging
from benchmarks.report import format_table, write_json
from benchmarks.timing import time_calls
from benchmarks.variants import build_model, compare
from snlp_compile import SNLPConfig, export_onnx
from snlp_compile.decoding.onnx_generate import INPUT_IDS, PAST, decode_path
from snlp_compile.models import GPTConfig

QUESTION = "onnx_cpu"
SEQUENTIAL = "sequential"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="GPTConfig preset (default char; smoke tiny)")
    parser.add_argument("--seq-len", type=int, default=None, help="forward tokens and decode past (default 512)")
    parser.add_argument("--iters", type=int, default=1, help="Newton iterations K of the SNLP file")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="onnxruntime intra-op threads")
    parser.add_argument("--calls", type=int, default=None, help="timed calls per round (default 5; smoke 2)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds, the variants alternating (default 6)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny preset, 16 tokens, 2 rounds of 2 calls")
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.smoke else "char")
    args.seq_len = args.seq_len or (16 if args.smoke else 512)
    args.calls = args.calls or (2 if args.smoke else 5)
    args.rounds = args.rounds or (2 if args.smoke else 6)
    for name in ("seq_len", "iters", "calls", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.threads) < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


CPU = torch.device("cpu")


def sessions(path: Path, threads: int) -> tuple[onnxruntime.InferenceSession, onnxruntime.InferenceSession]:
    """The prefill and decode sessions of `path` on the CPU provider with `threads` intra-op threads."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    make = lambda p: onnxruntime.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])  # noqa: E731
    return make(path), make(decode_path(path))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(max(args.threads))  # the exports
    context = max(GPTConfig.preset(args.preset).sequence_len, args.seq_len + 1)
    model = build_model(args.preset, torch.device("cpu"), torch.float32, args.seed, sequence_len=context)
    n_layer = model.config.n_layer
    files = args.out / "onnx"
    snlp = f"snlp K{args.iters}"
    rewrite = {SEQUENTIAL: False, snlp: True}
    config = SNLPConfig(iters=args.iters, fallback="error")
    example = torch.randint(0, model.config.vocab_size, (1, 8))
    paths = {}
    for name, rewritten in rewrite.items():
        start = time.perf_counter()
        path = files / f"{args.preset}_{name.replace(' ', '_')}.onnx"
        paths[name] = export_onnx(model, (example,), path, config, decode=True, rewrite=rewritten)
        print(f"exported {name} in {time.perf_counter() - start:.1f} s", flush=True)

    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(0, model.config.vocab_size, (1, args.seq_len), dtype=np.int64)
    token = rng.integers(0, model.config.vocab_size, (1, 1), dtype=np.int64)
    doc = {
        "question": QUESTION,
        "env": environment(CPU) | {"onnxruntime": onnxruntime.__version__},
        "settings": vars(args) | {"n_layer": n_layer, "context": context, "dtype": "float32"},
        "rows": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    logits: dict[tuple[str, str], np.ndarray] = {}
    for threads in args.threads:
        calls: dict[tuple[str, str, int], Callable[[], Any]] = {}
        for name, path in paths.items():
            prefill, step = sessions(path, threads)
            forward = lambda prefill=prefill: prefill.run(None, {INPUT_IDS: prompt})  # noqa: E731
            out, keys, values = forward()
            decode = lambda step=step, feed={INPUT_IDS: token, PAST[0]: keys, PAST[1]: values}: step.run(None, feed)  # noqa: E731
            logits[name, "forward"], logits[name, "decode"] = out, decode()[0]
            calls[name, "decode step", 1] = decode
            calls[name, f"forward {args.seq_len}", args.seq_len] = forward
        samples: dict[tuple[str, str, int], list[float]] = {key: [] for key in calls}
        for fn in calls.values():
            time_calls(fn, CPU, 0, args.warmup)
        for round_ in range(args.rounds):  # the variants alternate: both see the same load on the host
            for key in list(calls) if round_ % 2 == 0 else list(calls)[::-1]:
                samples[key] += time_calls(calls[key], CPU, 0, args.calls)
        for (name, workload, tokens), times in samples.items():
            ms = statistics.median(times)
            doc["rows"].append(
                dict(preset=args.preset, variant=name, workload=workload, threads=threads, ms=ms, tokens=tokens)
            )
            print(f"{threads} thread(s) {name:>12} {workload}: {ms:.3f} ms", flush=True)
        write_json(args.out / f"{QUESTION}.json", doc)
    for row in doc["rows"]:
        base = next(
            r["ms"]
            for r in doc["rows"]
            if (r["variant"], r["workload"], r["threads"]) == (SEQUENTIAL, row["workload"], row["threads"])
        )
        kind = "decode" if row["workload"] == "decode step" else "forward"
        rel, top1 = compare(torch.from_numpy(logits[row["variant"], kind]), torch.from_numpy(logits[SEQUENTIAL, kind]))
        row.update(speedup=base / row["ms"], tokens_per_s=row["tokens"] / row["ms"] * 1e3, rel_err=rel, top1=top1)
    write_json(args.out / f"{QUESTION}.json", doc)
    headers = ["workload", "threads", "variant", "ms", "x sequential", "tok/s", "rel. err", "top-1"]
    cells = [
        [
            r["workload"],
            str(r["threads"]),
            r["variant"],
            f"{r['ms']:.3f}",
            f"{r['speedup']:.2f}",
            f"{r['tokens_per_s']:.1f}",
            f"{r['rel_err']:.2e}",
            f"{r['top1']:.3f}",
        ]
        for r in sorted(doc["rows"], key=lambda r: (r["workload"], r["threads"], r["variant"] != SEQUENTIAL))
    ]
    print(f"{args.preset} ({n_layer} layers), onnxruntime {onnxruntime.__version__}, CPU; {snlp} vs {SEQUENTIAL}")
    print(format_table(headers, cells))
    return doc


if __name__ == "__main__":
    setup_logging()
    main()
