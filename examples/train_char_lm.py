r"""Train a byte-level LM (tinyshakespeare by default), optionally with the SNLP-aware regulariser.

    python examples/train_char_lm.py --model gpt --out runs/gpt_base
    python examples/train_char_lm.py --model gpt --reg-weight 0.5 --out runs/gpt_reg --device cuda --dtype bfloat16

A deep model on real code (python-stdlib-*.txt: `bash benchmarks/run_training_gpu.sh --copy-data`
puts them into data/; DEEP=1 of that script holds the flags of the 32-layer run):

    python examples/train_char_lm.py --data data/python-stdlib-train.txt --val-data data/python-stdlib-val.txt \
        --vocab 256 --n-layer 32 --n-embd 256 --n-head 4 --seq 512 --batch 32 --device cuda --dtype bfloat16 \
        --time-limit 510 --resume --out runs/deep/gpt_base

Tokens are bytes, ids < --vocab (128: ASCII text; 256: any file). Without --val-data the split is
fixed: the first 90% of --data trains, the last 10% validates; with it, all of --data trains.
Validation loss is measured every --eval-every steps on fixed windows. Every evaluation writes
OUT/metrics.json (curves and config) and OUT/last.pt (weights, optimizer, LR schedule, regulariser
step, random states and metrics: what --resume continues from, so a resumed run draws the batches
an uninterrupted one would); OUT/model.pt holds the best-validation weights. A run stops after
--steps, after --patience evaluations without a new best, or, with --time-limit, when the next step
and evaluation would end past that many seconds of this process: it then evaluates, saves and
stops, and the same command with --resume continues it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from snlp_compile.models import GPT, MHCGPT, GPTConfig
from snlp_compile.training import SNLPRegularizer

VOCAB_SIZE = 128  # the default vocabulary: ASCII bytes
MODELS = {"gpt": GPT, "mhc": MHCGPT}
DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"
# Flags a resumed run may change; every other flag must be the one last.pt was trained with.
RESUMABLE = frozenset({"resume", "out", "time_limit", "patience", "compile", "reg_checkpoint"})
FINISHED = ("steps", "patience")  # stop reasons after which --resume has nothing left to do


def read_ids(path: Path, vocab: int = VOCAB_SIZE) -> Tensor:
    """The bytes of a file as int64 ids; ValueError when it is empty or holds a byte >= vocab."""
    data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8).long()
    if data.numel() == 0:
        raise ValueError(f"{path} is empty")
    if int(data.max()) >= vocab:
        raise ValueError(f"{path} holds byte {int(data.max())} >= vocabulary size {vocab} (--vocab 256 takes any file)")
    return data


def load_splits(path: Path, vocab: int = VOCAB_SIZE, val_path: Path | None = None) -> tuple[Tensor, Tensor]:
    """(train, val) byte ids: all of `path` and all of `val_path`; without val_path, the first 90% /
    last 10% of `path`."""
    data = read_ids(path, vocab)
    if val_path is not None:
        return data, read_ids(val_path, vocab)
    cut = int(0.9 * data.numel())
    return data[:cut], data[cut:]


def random_batch(data: Tensor, batch: int, seq: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """`batch` random windows: inputs [batch, seq] and next-byte targets."""
    starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=generator)
    rows = torch.stack([data[s : s + seq + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


def eval_batches(data: Tensor, batch: int, seq: int, n_batches: int) -> list[tuple[Tensor, Tensor]]:
    """Fixed validation windows, evenly spaced over the split (the same for every run)."""
    count = batch * n_batches
    if data.numel() < seq + 2:
        raise ValueError(f"--seq {seq} is longer than the validation split ({data.numel()} bytes)")
    starts = torch.linspace(0, data.numel() - seq - 1, count).long().tolist()
    rows = torch.stack([data[s : s + seq + 1] for s in starts])
    return [(rows[i : i + batch, :-1], rows[i : i + batch, 1:]) for i in range(0, count, batch)]


def autocast(device: str, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for --dtype bfloat16; nothing for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def build_model(kind: str, config: GPTConfig) -> nn.Module:
    if kind not in MODELS:
        raise ValueError(f"--model must be one of {sorted(MODELS)}, got {kind!r}")
    return MODELS[kind](config)


def load_checkpoint(path: Path, device: str, **overrides: object) -> tuple[nn.Module, dict]:
    """(model in eval mode, checkpoint dict) from a model.pt (or last.pt) written by this script.
    `overrides` replace config fields; a longer sequence_len is safe (the rotary tables are not saved,
    and their first positions do not depend on it)."""
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    model = build_model(checkpoint["model"], GPTConfig(**{**checkpoint["config"], **overrides}))
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), checkpoint


@torch.no_grad()
def val_loss(model: nn.Module, batches: list, device: str, dtype: str) -> float:
    model.eval()
    total = 0.0
    for x, y in batches:
        with autocast(device, dtype):
            logits = model(x.to(device))
        total += F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten()).item()
    model.train()
    return total / len(batches)


def lr_factor(steps: int, warmup: int, step: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to 0.1 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def reg_iters(tokens: list[str]) -> list[int] | dict[int, list[int]]:
    """--reg-iters as SNLPRegularizer's iters: counts K for every n_par, or N:K pairs as {N: [K, ...]}."""
    pairs = [token.split(":") for token in tokens]
    try:
        if all(len(pair) == 1 for pair in pairs):
            return [int(token) for token in tokens]
        if all(len(pair) == 2 for pair in pairs):
            per_n_par: dict[int, list[int]] = {}
            for n, k in pairs:
                per_n_par.setdefault(int(n), []).append(int(k))
            return per_n_par
    except ValueError:
        pass
    raise ValueError(f"--reg-iters takes integers K or N:K pairs (not both), got {' '.join(tokens)}")


def regularizer(model: nn.Module, args: argparse.Namespace) -> SNLPRegularizer:
    """The regulariser the --reg-* flags describe (weight 0: off, a constant zero loss)."""
    if args.reg_form == "paper":
        n_par = args.reg_n_par or [max(1, model.config.n_layer // 2)]
        return SNLPRegularizer.paper(
            model,
            args.reg_weight,
            n_par=n_par,
            stride=args.reg_stride,
            surrogate=args.reg_surrogate,
            detach_target=args.reg_detach,
            warmup_steps=args.reg_warmup,
        )
    return SNLPRegularizer(
        model,
        weight=args.reg_weight,
        n_par=args.reg_n_par,
        stride=args.reg_stride,
        iters=args.reg_iters,
        detach_target=args.reg_detach,
        warmup_steps=args.reg_warmup,
        surrogate=args.reg_surrogate,
        checkpoint=args.reg_checkpoint,
    )


def rng_states(device: str) -> dict[str, Tensor]:
    """The default generators' states (CPU, and the CUDA device's when training there)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def save_atomic(obj: object, path: Path) -> None:
    """torch.save through a temporary file: an interrupt never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def resume(path: Path, args: argparse.Namespace, run: dict, parts: dict) -> dict:
    """Load last.pt into the model, optimizer, schedule, regulariser and generators of `parts`;
    returns its metrics. ValueError when it was trained with other flags (RESUMABLE may differ)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state["metrics"]["args"]
    changed = sorted(k for k in run.keys() | saved.keys() if k not in RESUMABLE and run.get(k) != saved.get(k))
    if changed:
        was = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} (now {run.get(k)})" for k in changed)
        raise ValueError(f"--resume: {path} was trained with {was}; only {sorted(RESUMABLE)} may change")
    parts["model"].load_state_dict(state["state_dict"])
    parts["optimizer"].load_state_dict(state["optimizer"])
    parts["schedule"].load_state_dict(state["schedule"])
    parts["regularizer"].step_count = state["reg_step"]
    parts["batches"].set_state(state["rng"]["batches"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"], args.device)
    return state["metrics"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="gpt")
    p.add_argument("--preset", choices=["tiny", "char"], default="char", help="GPTConfig preset (vocab: --vocab)")
    p.add_argument("--n-layer", type=int, default=None, help="override the preset's depth")
    p.add_argument("--n-embd", type=int, default=None, help="override the preset's width")
    p.add_argument("--n-head", type=int, default=None, help="override the preset's attention heads")
    p.add_argument("--vocab", type=int, default=VOCAB_SIZE, help="byte vocabulary: 128 (ASCII) or up to 256")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--val-data", type=Path, default=None, help="validation file; then all of --data trains")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-batches per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-warmup", type=int, default=50, help="linear LR warm-up steps, then cosine to 10%%")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--patience", type=int, default=None, help="stop after N evaluations without a new best")
    p.add_argument("--time-limit", type=float, default=None, help="seconds: evaluate, save and stop before them")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt when it exists")
    p.add_argument("--reg-weight", type=float, default=0.0, help="SNLP regulariser weight lambda (0: off)")
    p.add_argument("--reg-form", choices=["mean", "paper"], default="mean", help="paper: SNLPRegularizer.paper")
    p.add_argument("--reg-n-par", type=int, nargs="+", default=None, help="parallel layer counts (default L/2)")
    p.add_argument(
        "--reg-iters",
        nargs="+",
        default=["1"],
        help="iteration count(s) K regularised, for every n_par; or N:K pairs, e.g. 24:1 32:2 (the n_par N at K)",
    )
    p.add_argument("--reg-stride", type=int, default=0)
    p.add_argument("--reg-warmup", type=int, default=0)
    p.add_argument("--reg-detach", action="store_true", help="no gradient through the sequential target")
    p.add_argument("--reg-surrogate", choices=["auto", "identity", "hc"], default="auto")
    p.add_argument("--reg-checkpoint", action="store_true", help="recompute the SNLP solves in backward (less memory)")
    p.add_argument("--compile", action="store_true", help="train through torch.compile (inductor); hooks still fire")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    for name in ("steps", "batch", "seq", "accum", "eval_every", "eval_batches", "patience"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 2 <= args.vocab <= 256:
        p.error(f"--vocab must be in [2, 256] (byte ids), got {args.vocab}")
    if args.time_limit is not None and not args.time_limit > 0:
        p.error(f"--time-limit must be > 0 seconds, got {args.time_limit}")
    try:
        args.reg_iters = reg_iters(args.reg_iters)
    except ValueError as error:
        p.error(str(error))
    if args.reg_form == "paper" and (args.reg_iters != [1] or args.reg_checkpoint):
        p.error("--reg-form paper is K = 1 without recomputation: no --reg-iters or --reg-checkpoint")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Train (or continue with --resume); returns the metrics written to OUT/metrics.json."""
    started = time.perf_counter()
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    train, val = load_splits(args.data, args.vocab, args.val_data)
    shape = {name: getattr(args, name) for name in ("n_layer", "n_embd", "n_head") if getattr(args, name) is not None}
    config = GPTConfig.preset(args.preset, vocab_size=args.vocab, sequence_len=args.seq, **shape)
    model = build_model(args.model, config).to(args.device).train()
    reg = regularizer(model, args)
    forward = torch.compile(model) if args.compile else model  # the regulariser watches `model` either way
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, args.steps, args.lr_warmup))
    generator = torch.Generator().manual_seed(args.seed)
    val_set = eval_batches(val, args.batch, args.seq, args.eval_batches)
    args.out.mkdir(parents=True, exist_ok=True)
    run = {k: str(v) for k, v in vars(args).items()}
    metrics: dict = dict(config=dict(vars(config)), args=run, train=[], val=[], best_step=None, best_val=None)
    metrics.update(stopped=None, train_seconds=0.0)
    last = args.out / "last.pt"
    if args.resume and last.exists():
        parts = dict(model=model, optimizer=opt, schedule=schedule, regularizer=reg, batches=generator)
        metrics = resume(last, args, run, parts)
        print(f"{args.out.name}: resumed after step {len(metrics['train'])} (stopped: {metrics['stopped']})")
        if metrics["stopped"] in FINISHED:
            reg.remove()
            return metrics
        metrics.update(args=run, stopped=None)
    seconds_before = metrics["train_seconds"]
    start = time.perf_counter()
    metrics["interrupted"] = False
    step_seconds = eval_seconds = 0.0
    bar = tqdm(range(len(metrics["train"]) + 1, args.steps + 1), desc=args.out.name, dynamic_ncols=True)
    try:  # Ctrl-C / SIGINT (e.g. a time limit) stops training; curves and best checkpoint are kept
        for step in bar:
            step_start = time.perf_counter()
            ce_sum = reg_sum = 0.0
            for _ in range(args.accum):
                x, y = (t.to(args.device) for t in random_batch(train, args.batch, args.seq, generator))
                with autocast(args.device, args.dtype):
                    logits = forward(x)
                    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
                    penalty = reg.loss()
                ((ce + penalty) / args.accum).backward()
                ce_sum, reg_sum = ce_sum + ce.item() / args.accum, reg_sum + penalty.item() / args.accum
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            schedule.step()
            reg.step()
            metrics["train"].append(dict(step=step, ce=ce_sum, reg=reg_sum))
            bar.set_postfix(ce=f"{ce_sum:.3f}", reg=f"{reg_sum:.4f}")
            now = time.perf_counter()
            step_seconds = now - step_start
            out_of_time = args.time_limit is not None and now - started + step_seconds + eval_seconds > args.time_limit
            if step % args.eval_every and step != args.steps and not out_of_time:
                continue
            loss = val_loss(model, val_set, args.device, args.dtype)
            metrics["val"].append(dict(step=step, loss=loss, seconds=seconds_before + now - start))
            bar.write(f"step {step}: val loss {loss:.4f} (ppl {math.exp(loss):.3f})")
            if metrics["best_val"] is None or loss < metrics["best_val"]:
                checkpoint = dict(model=args.model, config=dict(vars(config)), state_dict=model.state_dict(), step=step)
                save_atomic(checkpoint, args.out / "model.pt")
                metrics["best_step"], metrics["best_val"] = step, loss
            stale = sum(v["step"] > metrics["best_step"] for v in metrics["val"])
            patience_out = args.patience is not None and stale >= args.patience
            reasons = [("steps", step == args.steps), ("patience", patience_out), ("time_limit", out_of_time)]
            metrics["stopped"] = next((reason for reason, hit in reasons if hit), None)
            metrics["train_seconds"] = seconds_before + time.perf_counter() - start
            state = dict(model=args.model, config=dict(vars(config)), state_dict=model.state_dict(), step=step)
            state.update(optimizer=opt.state_dict(), schedule=schedule.state_dict(), reg_step=reg.step_count)
            state.update(rng=rng_states(args.device) | {"batches": generator.get_state()}, metrics=metrics)
            save_atomic(state, last)
            (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
            eval_seconds = time.perf_counter() - now
            if metrics["stopped"] is not None:
                bar.write(f"step {step}: stopped ({metrics['stopped']}); best val loss {metrics['best_val']:.4f}")
                break
    except KeyboardInterrupt:
        metrics["interrupted"] = True
        bar.write(f"interrupted after step {len(metrics['train'])}: keeping the metrics and the best checkpoint")
    reg.remove()
    metrics["train_seconds"] = seconds_before + time.perf_counter() - start
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


if __name__ == "__main__":
    main()
