"""Train a char-level LM on tinyshakespeare, optionally with the SNLP-aware regulariser.

    python examples/train_char_lm.py --model gpt --out runs/gpt_base
    python examples/train_char_lm.py --model gpt --reg-weight 0.5 --out runs/gpt_reg --device cuda --dtype bfloat16

Characters are bytes (ids < 128); the split is fixed: the first 90% of the file trains, the last
10% validates. Validation loss is measured every --eval-every steps on fixed windows; the
best-validation weights go to OUT/model.pt and the curves and config to OUT/metrics.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from snlp_compile.models import GPT, MHCGPT, GPTConfig
from snlp_compile.training import SNLPRegularizer

VOCAB_SIZE = 128
MODELS = {"gpt": GPT, "mhc": MHCGPT}
DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"


def load_splits(path: Path) -> tuple[Tensor, Tensor]:
    """(train, val) byte ids of the file: first 90% / last 10%."""
    data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8).long()
    if data.numel() == 0 or int(data.max()) >= VOCAB_SIZE:
        raise ValueError(f"--data {path} must be non-empty ASCII text (byte values < {VOCAB_SIZE})")
    cut = int(0.9 * data.numel())
    return data[:cut], data[cut:]


def random_batch(data: Tensor, batch: int, seq: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """`batch` random windows: inputs [batch, seq] and next-char targets."""
    starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=generator)
    rows = torch.stack([data[s : s + seq + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


def eval_batches(data: Tensor, batch: int, seq: int, n_batches: int) -> list[tuple[Tensor, Tensor]]:
    """Fixed validation windows, evenly spaced over the split (the same for every run)."""
    count = batch * n_batches
    if data.numel() < seq + 2:
        raise ValueError(f"--seq {seq} is longer than the validation split ({data.numel()} characters)")
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


def load_checkpoint(path: Path, device: str) -> tuple[nn.Module, dict]:
    """(model in eval mode, checkpoint dict) from a model.pt written by this script."""
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    model = build_model(checkpoint["model"], GPTConfig(**checkpoint["config"]))
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="gpt")
    p.add_argument("--preset", choices=["tiny", "char"], default="char", help="GPTConfig preset (vocab is 128)")
    p.add_argument("--n-layer", type=int, default=None, help="override the preset's depth")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-batches per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-warmup", type=int, default=50, help="linear LR warm-up steps, then cosine to 10%%")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--reg-weight", type=float, default=0.0, help="SNLP regulariser weight lambda (0: off)")
    p.add_argument("--reg-n-par", type=int, nargs="+", default=None, help="parallel layer counts (default L/2)")
    p.add_argument("--reg-iters", type=int, nargs="+", default=[1], help="iteration count(s) K regularised")
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
    for name in ("steps", "batch", "seq", "accum", "eval_every", "eval_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Train; returns the metrics written to OUT/metrics.json."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    train, val = load_splits(args.data)
    overrides = dict(vocab_size=VOCAB_SIZE, sequence_len=args.seq)
    if args.n_layer is not None:
        overrides["n_layer"] = args.n_layer
    config = GPTConfig.preset(args.preset, **overrides)
    model = build_model(args.model, config).to(args.device).train()
    reg = SNLPRegularizer(
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
    forward = torch.compile(model) if args.compile else model  # the regulariser watches `model` either way
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < args.lr_warmup:
            return (step + 1) / args.lr_warmup
        progress = (step - args.lr_warmup) / max(1, args.steps - args.lr_warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    generator = torch.Generator().manual_seed(args.seed)
    val_set = eval_batches(val, args.batch, args.seq, args.eval_batches)
    args.out.mkdir(parents=True, exist_ok=True)
    metrics: dict = dict(config=dict(vars(config)), args={k: str(v) for k, v in vars(args).items()})
    metrics.update(train=[], val=[], best_step=None, best_val=None)
    start = time.perf_counter()
    bar = tqdm(range(1, args.steps + 1), desc=args.out.name, dynamic_ncols=True)
    metrics["interrupted"] = False
    try:  # Ctrl-C / SIGINT (e.g. a time limit) stops training; curves and best checkpoint are kept
        for step in bar:
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
            if step % args.eval_every == 0 or step == args.steps:
                loss = val_loss(model, val_set, args.device, args.dtype)
                metrics["val"].append(dict(step=step, loss=loss, seconds=time.perf_counter() - start))
                bar.write(f"step {step}: val loss {loss:.4f} (ppl {math.exp(loss):.3f})")
                if metrics["best_val"] is None or loss < metrics["best_val"]:
                    state = model.state_dict()
                    checkpoint = dict(model=args.model, config=dict(vars(config)), state_dict=state, step=step)
                    torch.save(checkpoint, args.out / "model.pt.tmp")  # an interrupt never leaves half a file
                    os.replace(args.out / "model.pt.tmp", args.out / "model.pt")
                    metrics["best_step"], metrics["best_val"] = step, loss
    except KeyboardInterrupt:
        metrics["interrupted"] = True
        bar.write(f"interrupted after step {len(metrics['train'])}: keeping the metrics and the best checkpoint")
    reg.remove()
    metrics["train_seconds"] = time.perf_counter() - start
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


if __name__ == "__main__":
    main()
