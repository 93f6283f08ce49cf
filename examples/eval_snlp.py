r"""Validation perplexity of trained checkpoints over an SNLP grid, and (--speed) their decode and forward speed.

    python examples/eval_snlp.py runs/gpt_base/model.pt runs/gpt_reg/model.pt --out runs/eval
    python examples/eval_snlp.py runs/deep/gpt_base/model.pt runs/deep/gpt_reg_w4/model.pt \
        --val-data data/python-stdlib-val.txt --batch 32 --seq 512 --eval-batches 16 \
        --speed --time-limit 420 --device cuda --dtype bfloat16 --out runs/deep/eval

Grid: n_par in --n-par (default L/4, L/2, 3L/4, L) x fuse in --fuse x K in --iters, where valid (fuse
<= n_par); a K past the solve's useful iterations (`solver.useful_iters`) repeats a smaller K of the
list and is left out. For each checkpoint (from examples/train_char_lm.py) and configuration: the
perplexity on the trainer's validation windows (the last 10% of --data, or all of --val-data), top-1
agreement with the model's own sequential predictions, and the ms per batch of that measurement
(inner eager: not a speed figure). Checkpoints of one architecture share one compile per configuration.

--speed, per checkpoint on its own weights (one copy of each architecture in --dtype, compiled once
per variant): tokens/s of a greedy `snlp_compile.generate` of --new-tokens after the first
--prompt-len bytes of the validation data (best of --decode-reps after one untimed run), and the
median time of one --forward-len forward. Sequential baselines: inductor, and inductor + CUDA graphs
on CUDA (--speed-inner eager: the eager model); SNLP: the grid's configurations with K in
--speed-iters and fuse in --speed-fuse, in the order of `speed_rank` (cheapest first), compiled
with --speed-inner (and CUDA graphs on CUDA), the prompt through the sequential model; none starts
after --time-limit seconds. Speedups are against the best baseline of each checkpoint; "same new
tokens" counts the leading generated tokens equal to the first baseline's.

Writes OUT/eval.json, OUT/eval.md and OUT/frontier.png (perplexity per configuration; with --speed,
decode and forward speedup against perplexity): first after the perplexity grid, again after speed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import Tensor, nn
from train_char_lm import DEFAULT_DATA, autocast, eval_batches, load_checkpoint, load_splits, read_ids

import snlp_compile
from snlp_compile import SNLPConfig, generate, prepare
from snlp_compile.fresh_code import fresh_function
from snlp_compile.solver import useful_iters
from snlp_compile.tuning.measure import forward
from snlp_compile.tuning.timing import time_calls

logger = logging.getLogger("snlp_compile")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BASELINES = ("eager", "inductor", "inductor + CUDA graphs")  # the sequential speed variants


def config_label(n_par: int, fuse: int, iters: int) -> str:
    return f"npar{n_par} K{iters}" if fuse == 1 else f"npar{n_par} F{fuse} K{iters}"


def snlp_grid(n_layer: int, n_par: list[int] | None, iters: list[int], fuse: list[int]) -> dict[str, dict]:
    """Label -> SNLPConfig options (n_seq = L - n_par) of every (n_par, fuse <= n_par, K); n_par defaults
    to L/4, L/2, 3L/4, L. A K whose solve runs as many iterations as a smaller K of the list (both at
    least `useful_iters`) is left out: it repeats that configuration."""
    grid = {}
    for n in n_par or sorted({n_layer * quarter // 4 for quarter in (1, 2, 3, 4)} - {0}):
        for f in (f for f in fuse if f <= n):
            useful = useful_iters(n_layer, SNLPConfig(n_seq=n_layer - n, fuse=f))
            reached: set[int] = set()
            for k in sorted(iters):
                if min(k, useful) not in reached:
                    reached.add(min(k, useful))
                    grid[config_label(n, f, k)] = dict(n_seq=n_layer - n, fuse=f, iters=k)
    return grid


def architectures(loaded: list[tuple[nn.Module, dict]]) -> list[list[int]]:
    """Indices of the checkpoints grouped by model kind and config (one compile serves a group)."""
    groups: dict[str, list[int]] = {}
    for i, (_, checkpoint) in enumerate(loaded):
        groups.setdefault(repr((checkpoint["model"], checkpoint["config"])), []).append(i)
    return list(groups.values())


@torch.no_grad()
def measure(model: nn.Module, batches: list, device: str, dtype: str, reference: list | None) -> dict:
    """Perplexity, top-1 agreement with `reference` predictions and seconds per batch."""
    loss, agree, seconds, predictions = 0.0, 0.0, [], []
    for i, (x, y) in enumerate(batches):
        x, y = x.to(device), y.to(device)
        for _ in range(2 if i == 0 else 1):  # the first call of a batch shape compiles
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            with autocast(device, dtype):
                logits = model(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        loss += F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item()
        top1 = logits.argmax(-1)
        predictions.append(top1)
        if reference is not None:
            agree += (top1 == reference[i]).float().mean().item()
    n = len(batches)
    result = dict(ppl=math.exp(loss / n), ms_per_batch=1e3 * sum(seconds) / n)
    result["top1_agreement"] = 1.0 if reference is None else agree / n
    return result | dict(predictions=predictions)


def evaluate(loaded: list[tuple[nn.Module, dict]], names: list[str], batches: list, args: argparse.Namespace) -> dict:
    """Per checkpoint name: step, model kind and {label: metrics} for "sequential" and the grid.

    Checkpoints of one architecture share the first one's model, with their weights loaded in
    place (the snlp backend refreshes its stacked weights), so a configuration compiles once.
    """
    results: list[dict] = [{} for _ in loaded]
    references: list[list] = [[] for _ in loaded]
    for i, (model, _) in enumerate(loaded):
        results[i]["sequential"] = measure(model, batches, args.device, args.dtype, None)
        references[i] = results[i]["sequential"].pop("predictions")
    for members in architectures(loaded):
        model = loaded[members[0]][0]
        for label, options in snlp_grid(model.config.n_layer, args.n_par, args.iters, args.fuse).items():
            torch._dynamo.reset()
            options = dict(options, inner=args.inner, fallback="error")
            compiled = torch.compile(model, backend="snlp", options=options, dynamic=False)
            for i in members:
                model.load_state_dict(loaded[i][1]["state_dict"])
                results[i][label] = measure(compiled, batches, args.device, args.dtype, references[i])
                del results[i][label]["predictions"]
                print(
                    f"{names[i]}: {label}: ppl {results[i][label]['ppl']:.3f} (sequential "
                    f"{results[i]['sequential']['ppl']:.3f})"
                )
    torch._dynamo.reset()
    return {
        name: dict(step=c["step"], model=c["model"], results=r)
        for name, (_, c), r in zip(names, loaded, results, strict=True)
    }


def speed_rank(options: dict, n_layer: int) -> tuple:
    """The order --speed times configurations in, cheapest first: a quarter of the layers run
    sequentially counts as one iteration (npar32 K1, npar24 K1, npar32 K2, npar16 K1, ... for L = 32)."""
    return 4 * options["n_seq"] / n_layer + options["iters"], options["iters"], options["n_seq"], options["fuse"]


def decode_rate(run: Callable[[], object], reps: int) -> tuple[float, Tensor]:
    """(best tokens/s of `reps` generations after one untimed one, that generation's tokens)."""
    run()  # compiles and records CUDA graphs
    best = max((run() for _ in range(reps)), key=lambda generation: generation.stats.tokens_per_s)
    return best.stats.tokens_per_s, best.tokens


def speed_variants(
    model: nn.Module, label_options: dict[str, dict], prompt: Tensor, tokens: Tensor, args: argparse.Namespace
) -> dict:
    """Name -> (decode run, forward run) of the sequential baselines, then of each SNLP configuration
    in `label_options` (compiled lazily, at a variant's first call)."""
    cuda = prompt.device.type == "cuda"
    inductor = args.speed_inner == "inductor"
    cache = model.make_kv_cache(1, prompt.size(1) + args.new_tokens - 1, prompt.device, next(model.parameters()).dtype)

    def decode(config: SNLPConfig, mode: str) -> Callable[[], object]:
        run = dict(mode=mode, compile_sequential=inductor, kv_cache=cache)  # one cache: CUDA graphs replay on it
        return lambda: generate(model, prompt, args.new_tokens, config, **run)

    if inductor:
        variants = {}
        for cudagraphs in (False, True) if cuda else (False,):
            compiled = torch.compile(fresh_function(forward), mode="reduce-overhead" if cudagraphs else None)
            name = "inductor + CUDA graphs" if cudagraphs else "inductor"
            variants[name] = decode(SNLPConfig(cudagraphs=cudagraphs), "sequential"), partial(compiled, model, tokens)
    else:
        variants = {"eager": (decode(SNLPConfig(), "sequential"), partial(model, tokens))}
    for label, options in label_options.items():
        config = SNLPConfig(**options, inner=args.speed_inner, cudagraphs=cuda and inductor, fallback="error")
        config = config.replace(prefill="sequential", gemv=args.gemv)
        compiled = torch.compile(fresh_function(forward), backend="snlp", options=asdict(config), dynamic=False)
        variants[label] = decode(config, "snlp"), partial(compiled, model, tokens)
    return variants


@torch.no_grad()
def measure_speed(
    model: nn.Module, states: dict[str, dict], variants: dict, args: argparse.Namespace, started: float
) -> dict:
    """Rows {checkpoint name: {variant: decode_tok_s, forward_ms, same_new_tokens}} with each
    checkpoint's state loaded in turn, plus "skipped" (variants not started by --time-limit, or cut by
    an interrupt: SIGINT, "interrupted" True), and "errors" ({variant: message}: an SNLP variant that
    failed; a failing baseline raises)."""
    device = next(model.parameters()).device
    rows: dict = {name: {} for name in states}
    reference: dict[str, Tensor] = {}
    out: dict = dict(rows=rows, skipped=[], errors={}, interrupted=False)
    for index, (variant, (decode, full)) in enumerate(variants.items()):
        baseline = variant in BASELINES
        if not baseline and args.time_limit is not None and time.perf_counter() - started > args.time_limit:
            out["skipped"] = list(variants)[index:]
            logger.warning("eval_snlp: --time-limit reached; speed not measured for %s", out["skipped"])
            break
        try:
            for name, state in states.items():
                model.load_state_dict(state)
                rate, generated = decode_rate(decode, args.decode_reps)
                ms = statistics.median(time_calls(full, device, args.forward_warmup, args.forward_reps))
                new = generated[0, -args.new_tokens :]
                same = int(torch.cumprod(new == reference.setdefault(name, new), 0).sum())
                rows[name][variant] = dict(decode_tok_s=rate, forward_ms=ms, same_new_tokens=same)
        except KeyboardInterrupt:  # e.g. run_training_gpu.sh's EVAL_LIMIT: keep what was measured
            out.update(skipped=list(variants)[index:], interrupted=True)
            logger.warning("eval_snlp: interrupted; speed not measured for %s", out["skipped"])
            for row in rows.values():
                row.pop(variant, None)
            break
        except Exception as error:  # noqa: BLE001  (one failing SNLP variant must not lose the others)
            if baseline:
                raise
            out["errors"][variant] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
            logger.warning("eval_snlp: speed of %s failed: %s", variant, out["errors"][variant])
        for name in states:
            if variant in rows[name]:
                row = rows[name][variant]
                print(f"{name}: {variant}: {row['decode_tok_s']:.1f} tok/s, forward {row['forward_ms']:.3f} ms")
    return out


def add_speed(
    paths: list[Path],
    loaded: list,
    names: list[str],
    evaluations: dict,
    val: Tensor,
    args: argparse.Namespace,
    started: float,
) -> dict:
    """--speed: measure every architecture group; speed fields go into `evaluations` (the baselines
    under "baselines", speedups against the best baseline in each configuration's results, the best
    baseline's figures in "sequential"). Returns {"skipped": {name: variants}, "errors": {name: {variant:
    message}}}."""
    length = max(args.prompt_len + args.new_tokens, args.forward_len)
    prompt = val[: args.prompt_len].view(1, -1).to(args.device)
    tokens = val[: args.forward_len].view(1, -1).to(args.device)
    summary: dict = dict(skipped={}, errors={})
    for members in architectures(loaded):
        config = loaded[members[0]][1]["config"]
        model, _ = load_checkpoint(paths[members[0]], args.device, sequence_len=max(config["sequence_len"], length))
        model = prepare(model.to(DTYPES[args.dtype]).requires_grad_(False))  # layer weights stacked once
        grid = snlp_grid(config["n_layer"], args.n_par, args.iters, args.fuse)
        timed = [label for label, o in grid.items() if o["iters"] in args.speed_iters and o["fuse"] in args.speed_fuse]
        timed.sort(key=lambda label: speed_rank(grid[label], config["n_layer"]))
        variants = speed_variants(model, {label: grid[label] for label in timed}, prompt, tokens, args)
        states = {names[i]: loaded[i][1]["state_dict"] for i in members}
        measured = measure_speed(model, states, variants, args, started)
        summary["skipped"].update(dict.fromkeys(states, measured["skipped"]))
        summary["errors"].update(dict.fromkeys(states, measured["errors"]))
        for name, rows in measured["rows"].items():
            baselines = {v: rows.pop(v) for v in BASELINES if v in rows}
            if not baselines:  # interrupted before the baselines: no speed for this checkpoint
                continue
            best_decode = max(row["decode_tok_s"] for row in baselines.values())
            best_forward = min(row["forward_ms"] for row in baselines.values())
            evaluations[name]["baselines"] = baselines
            rows["sequential"] = dict(decode_tok_s=best_decode, forward_ms=best_forward)
            rows["sequential"]["same_new_tokens"] = args.new_tokens
            for label, row in rows.items():
                row.update(
                    decode_x_best=row["decode_tok_s"] / best_decode, forward_x_best=best_forward / row["forward_ms"]
                )
                evaluations[name]["results"][label].update(row)
        if measured["interrupted"]:
            break
    return summary


def plot(evaluations: dict, path: Path) -> None:
    """Perplexity per configuration; with speed, decode and forward speedup against perplexity."""
    panels = ["decode_x_best", "forward_x_best"]
    speed = any(panels[0] in row for e in evaluations.values() for row in e["results"].values())
    fig = Figure(figsize=(6.5 * (3 if speed else 1), 4.8))
    axes = fig.subplots(1, 3 if speed else 1, squeeze=False)[0]
    tab20 = colormaps["tab20"]  # dark/light pairs of one hue: all dark ones first, then the light ones
    palette = [tab20(i) for i in (*range(0, 20, 2), *range(1, 20, 2))]
    for i, (name, evaluation) in enumerate(evaluations.items()):
        results = evaluation["results"]
        style = dict(color=palette[i % len(palette)], marker="s" if evaluation["model"] == "mhc" else "o")
        axes[0].plot(list(results), [r["ppl"] for r in results.values()], label=name, **style)
        for ax, key in zip(axes[1:], panels, strict=False):
            timed = {label: r for label, r in results.items() if key in r}
            ax.scatter([r[key] for r in timed.values()], [r["ppl"] for r in timed.values()], label=name, **style)
            for label, r in timed.items():
                ax.annotate(label, (r[key], r["ppl"]), fontsize=7)
    axes[0].set(ylabel="validation perplexity", yscale="log", title="perplexity per configuration")
    axes[0].tick_params(axis="x", rotation=60, labelsize=7)
    axes[0].legend()
    for ax, what in zip(axes[1:], ("decode tokens/s", "forward time"), strict=False):
        ax.set(xlabel=f"{what}: x best sequential", ylabel="validation perplexity", yscale="log")
        ax.set_title(f"{what} vs perplexity")
        ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(report: dict) -> str:
    """The report's tables: perplexity (and speed) per checkpoint and configuration; baselines."""
    lines = ["# SNLP evaluation", "", f"`{report['command']}`", ""]
    lines += ["| checkpoint | config | PPL | vs sequential | top-1 | decode tok/s | x best | same new tokens |"]
    lines[-1] += " forward ms | x best |"
    lines.append("|---" * 10 + "|")
    for name, evaluation in report["checkpoints"].items():
        sequential = evaluation["results"]["sequential"]["ppl"]
        for label, r in evaluation["results"].items():
            cells = [name, label, f"{r['ppl']:.4f}", f"{100 * (r['ppl'] / sequential - 1):+.2f}%"]
            cells.append(f"{r['top1_agreement']:.3f}")
            if "decode_tok_s" in r:
                cells += [f"{r['decode_tok_s']:.1f}", f"{r['decode_x_best']:.2f}", str(r["same_new_tokens"])]
                cells += [f"{r['forward_ms']:.3f}", f"{r['forward_x_best']:.2f}"]
            else:
                cells += ["-"] * 5
            lines.append("| " + " | ".join(cells) + " |")
    baselines = [(name, e["baselines"]) for name, e in report["checkpoints"].items() if "baselines" in e]
    if baselines:
        lines += ["", "| checkpoint | sequential baseline | decode tok/s | forward ms |", "|---|---|---|---|"]
        for name, rows in baselines:
            lines += [f"| {name} | {v} | {r['decode_tok_s']:.1f} | {r['forward_ms']:.3f} |" for v, r in rows.items()]
    for key in ("skipped", "errors"):
        for name, what in report.get("speed", {}).get(key, {}).items():
            if what:
                lines += ["", f"{name}, speed {key}: {what}"]
    return "\n".join(lines) + "\n"


def tune_checkpoints(paths: list[Path], names: list[str], val: Tensor, args: argparse.Namespace) -> dict:
    """Per checkpoint and budget: what `snlp_compile.tune` picks on --tune-rows validation rows, the model
    in --dtype on --device (frontier plot OUT/tune_<name>_<budget>.png)."""
    rows = val[: args.tune_rows * args.seq].view(args.tune_rows, args.seq)
    found: dict = {}
    for path, name in zip(paths, names, strict=True):
        model, _ = load_checkpoint(path, args.device)
        model = model.to(DTYPES[args.dtype])
        for budget in args.tune:
            torch._dynamo.reset()
            base = {"inner": args.speed_inner}
            result = snlp_compile.tune(model, rows, budget=budget, base=base, time_limit=args.tune_time_limit)
            result.plot(args.out / f"tune_{name}_{budget:g}.png")
            found.setdefault(name, {})[f"{budget:g}"] = dict(
                config=None if result.chosen is None else result.chosen.label(),
                speedup=result.speedup,
                reason=result.reason,
                settings=len(result.frontier),
            )
            print(f"{name}: tune budget {budget:g}: {result}")
    return found


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    (out / "eval.md").write_text(markdown(report))
    plot(report["checkpoints"], out / "frontier.png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", type=Path, nargs="+", help="model.pt files; named by their folder")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--val-data", type=Path, default=None, help="validation file (default: last 10%% of --data)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--n-par", type=int, nargs="+", default=None, help="parallel layer counts (default L/4 .. L)")
    p.add_argument("--iters", type=int, nargs="+", default=[1, 2, 4], help="iteration counts K")
    p.add_argument("--fuse", type=int, nargs="+", default=[1, 2], help="layers per super-layer")
    p.add_argument("--inner", choices=["eager", "inductor"], default="eager", help="compiler after the SNLP rewrite")
    p.add_argument("--speed", action="store_true", help="also decode tokens/s and forward time (see above)")
    p.add_argument("--speed-iters", type=int, nargs="+", default=[1, 2], help="K of the timed configurations")
    p.add_argument("--speed-fuse", type=int, nargs="+", default=[1], help="fuse of the timed configurations")
    p.add_argument("--speed-inner", choices=["eager", "inductor"], default=None, help="default: inductor on CUDA")
    p.add_argument("--gemv", action="store_true", help="SNLP decode with the Triton GEMV kernels (gemv=True)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--decode-reps", type=int, default=3)
    p.add_argument("--forward-len", type=int, default=2048)
    p.add_argument("--forward-warmup", type=int, default=3)
    p.add_argument("--forward-reps", type=int, default=20)
    p.add_argument("--time-limit", type=float, default=None, help="seconds after which no speed variant starts")
    p.add_argument("--tune", type=float, nargs="+", default=None, help="loss budgets: snlp_compile.tune per checkpoint")
    p.add_argument("--tune-rows", type=int, default=8, help="validation rows of --seq tokens the tuner scores")
    p.add_argument(
        "--tune-time-limit", type=float, default=None, help="seconds per tune call after which no setting starts"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    counts = ["batch", "seq", "eval_batches", "prompt_len", "new_tokens", "decode_reps", "forward_len", "forward_reps"]
    for name in counts:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("n_par", "iters", "fuse", "speed_iters", "speed_fuse"):
        if any(v < 1 for v in getattr(args, name) or []):
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.tune_time_limit is not None and not 0 < args.tune_time_limit < math.inf:
        p.error(f"--tune-time-limit must be a number of seconds > 0, got {args.tune_time_limit}")
    if args.speed_inner is None:
        args.speed_inner = "inductor" if torch.device(args.device).type == "cuda" else "eager"
    names = [path.parent.name or str(path) for path in args.checkpoints]
    if len(set(names)) != len(names):
        p.error(f"checkpoints must lie in differently named folders, got {names}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Evaluate; returns what is written to OUT/eval.json."""
    started = time.perf_counter()
    args = parse_args(argv)
    names = [path.parent.name or str(path) for path in args.checkpoints]
    loaded = [load_checkpoint(path, args.device) for path in args.checkpoints]
    for name, (model, _) in zip(names, loaded, strict=True):
        if max(args.n_par or [1]) > model.config.n_layer:
            raise ValueError(f"--n-par {args.n_par}: {name} has {model.config.n_layer} layers")
    vocab = min(model.config.vocab_size for model, _ in loaded)
    val = read_ids(args.val_data, vocab) if args.val_data else load_splits(args.data, vocab)[1]
    if args.speed and val.numel() < max(args.prompt_len, args.forward_len):
        raise ValueError(f"--prompt-len / --forward-len: the validation data has only {val.numel()} bytes")
    evaluations = evaluate(loaded, names, eval_batches(val, args.batch, args.seq, args.eval_batches), args)
    command = " ".join(["examples/eval_snlp.py", *(sys.argv[1:] if argv is None else argv)])
    report = dict(command=command, args={k: str(v) for k, v in vars(args).items()}, checkpoints=evaluations)
    write(report, args.out)
    if args.speed:
        report["speed"] = add_speed(args.checkpoints, loaded, names, evaluations, val, args, started)
        write(report, args.out)
    if args.tune:
        report["tune"] = tune_checkpoints(args.checkpoints, names, val, args)
        write(report, args.out)
    return report


if __name__ == "__main__":
    main()
