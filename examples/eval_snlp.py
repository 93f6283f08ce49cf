"""Validation perplexity of trained checkpoints, sequential and through the snlp backend.

    python examples/eval_snlp.py runs/gpt_base/model.pt runs/gpt_reg/model.pt --out runs/eval

For each checkpoint (from examples/train_char_lm.py) and each configuration of a fixed grid
(n_par = L/2 with K = 1, 2; n_par = L with K = 1, 2, 4; n_par = L fused in pairs with K = 2) it
measures perplexity on the trainer's validation windows, top-1 agreement with the sequential
model and the time per batch (after one warm-up batch), and writes OUT/eval.json and the
frontier plot OUT/frontier.png (perplexity per configuration, and perplexity against time).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import nn
from train_char_lm import DEFAULT_DATA, autocast, eval_batches, load_checkpoint, load_splits


def snlp_grid(n_layer: int) -> dict[str, dict]:
    """Label -> SNLPConfig options of the evaluated configurations (n_par = L - n_seq)."""
    half = n_layer // 2
    grid = {f"npar{half} K{k}": dict(n_seq=n_layer - half, iters=k) for k in (1, 2)}
    grid.update({f"npar{n_layer} K{k}": dict(iters=k) for k in (1, 2, 4)})
    grid[f"npar{n_layer} F2 K2"] = dict(fuse=2, iters=2)
    return grid


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


def evaluate(paths: list[Path], batches: list, args: argparse.Namespace) -> list[dict]:
    """Per checkpoint: step, model kind and {label: metrics} for "sequential" and the grid.

    Checkpoints of one architecture share the first one's model, with their weights loaded in
    place (the snlp backend refreshes its stacked weights), so a configuration compiles once.
    """
    loaded = [load_checkpoint(path, args.device) for path in paths]
    groups: dict[str, list[int]] = {}
    for i, (_, checkpoint) in enumerate(loaded):
        groups.setdefault(repr((checkpoint["model"], checkpoint["config"])), []).append(i)
    results: list[dict] = [{} for _ in paths]
    references: list[list] = [[] for _ in paths]
    for i, (model, _) in enumerate(loaded):
        results[i]["sequential"] = measure(model, batches, args.device, args.dtype, None)
        references[i] = results[i]["sequential"].pop("predictions")
    for members in groups.values():
        model = loaded[members[0]][0]
        for label, options in snlp_grid(model.config.n_layer).items():
            torch._dynamo.reset()
            options = dict(options, inner=args.inner, fallback="error")
            compiled = torch.compile(model, backend="snlp", options=options, dynamic=False)
            for i in members:
                model.load_state_dict(loaded[i][1]["state_dict"])
                results[i][label] = measure(compiled, batches, args.device, args.dtype, references[i])
                del results[i][label]["predictions"]
                print(
                    f"{paths[i]}: {label}: ppl {results[i][label]['ppl']:.3f} (sequential "
                    f"{results[i]['sequential']['ppl']:.3f})"
                )
    torch._dynamo.reset()
    return [dict(step=c["step"], model=c["model"], results=r) for (_, c), r in zip(loaded, results, strict=True)]


def plot(evaluations: dict, path: Path) -> None:
    fig = Figure(figsize=(13, 4.5))
    by_config, by_time = fig.subplots(1, 2)
    tab20 = colormaps["tab20"]  # dark/light pairs of one hue: all dark ones first, then the light ones
    palette = [tab20(i) for i in (*range(0, 20, 2), *range(1, 20, 2))]
    for i, (name, evaluation) in enumerate(evaluations.items()):
        labels = list(evaluation["results"])
        ppl = [evaluation["results"][k]["ppl"] for k in labels]
        ms = [evaluation["results"][k]["ms_per_batch"] for k in labels]
        style = dict(color=palette[i % len(palette)], marker="s" if evaluation["model"] == "mhc" else "o")
        by_config.plot(labels, ppl, label=name, **style)
        by_time.scatter(ms, ppl, label=name, **style)
        for label, x, y in zip(labels, ms, ppl, strict=True):
            by_time.annotate(label, (x, y), fontsize=7)
    by_config.set(ylabel="validation perplexity", yscale="log", title="perplexity per configuration")
    by_config.tick_params(axis="x", rotation=30)
    by_time.set(xlabel="ms per batch", ylabel="validation perplexity", yscale="log", title="quality vs speed")
    by_config.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    """Evaluate; returns what is written to OUT/eval.json."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", type=Path, nargs="+", help="model.pt files; named by their folder")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--inner", choices=["eager", "inductor"], default="eager", help="compiler after the SNLP rewrite")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    names = [path.parent.name or str(path) for path in args.checkpoints]
    if len(set(names)) != len(names):
        p.error(f"checkpoints must lie in differently named folders, got {names}")
    batches = eval_batches(load_splits(args.data)[1], args.batch, args.seq, args.eval_batches)
    evaluations = dict(zip(names, evaluate(args.checkpoints, batches, args), strict=True))
    report = dict(args={k: str(v) for k, v in vars(args).items()}, checkpoints=evaluations)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval.json").write_text(json.dumps(report, indent=1))
    plot(evaluations, args.out / "frontier.png")
    return report


if __name__ == "__main__":
    main()
