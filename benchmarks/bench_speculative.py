"""Decode tokens/s of whole generations: sequential, SNLP and self-speculative (greedy).

Each preset decodes --new-tokens after a random --context-token prompt with
`snlp_compile.generate`: "sequential" (the exact model, inductor-compiled), "snlp" (every step
through the SNLP-compiled model) and "speculative" (SNLP drafts, one sequential forward verifies;
greedy output identical to sequential, checked). Weights are random unless --checkpoint is given
(a state_dict of the preset's GPT, or a GPT checkpoint of examples/train_char_lm.py, whose config
then overrides the preset's): acceptance rates on random weights are a lower bound. The prompt is
random ids, or with --prompt-data the start of that text file's validation split (its last 10%,
as in train_char_lm.py). Timing excludes compilation (one untimed warm-up generation per mode).
Speculative rows split their time into drafting, verifying (forward and acceptance rule, on the
device's clock) and the rest (host work between them). Writes OUT/speculative.json.

    PYTHONPATH=. python3 benchmarks/bench_speculative.py --preset d20 --context 512 --out out
    PYTHONPATH=. python3 benchmarks/bench_speculative.py --preset char --checkpoint runs/gpt_reg/model.pt \
        --prompt-data ../shared/data/tinyshakespeare.txt --context 128 --new-tokens 120 --n-par 4 --out out
    PYTHONPATH=. python3 benchmarks/bench_speculative.py --smoke --out /tmp/smoke   # tiny, CPU
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.harness import environment, run_device, run_dtype, setup_logging
from benchmarks.report import format_table, write_json
from benchmarks.timing import timed_once
from benchmarks.variants import DTYPES, build_model
from snlp_compile import SNLPConfig, generate
from snlp_compile.models import StaticKVCache


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=None, help="default: d20 paper-0.5b (smoke: tiny)")
    parser.add_argument("--context", type=int, default=None, help="prompt tokens (default 512; smoke 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated (default 128; smoke 8)")
    parser.add_argument("--draft-len", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--n-par", type=int, default=None, help="parallel layers of the SNLP drafter (default all)")
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--checkpoint", type=Path, default=None, help="trained weights instead of random ones")
    parser.add_argument("--prompt-data", type=Path, default=None, help="text file: prompt from its validation split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny preset on CPU, eager inner compiler")
    parser.add_argument("--out", type=Path, default=Path("out"))
    return parser.parse_args(argv)


@torch.no_grad()
def divergence(model: torch.nn.Module, reference: torch.Tensor, tokens: torch.Tensor, prompt_len: int) -> str:
    """ "same" when tokens equal the sequential reference [1, T]; else where the first new token differs
    and the gap between the two largest logits of one eager full-sequence forward of the reference at
    that point: a gap near the dtype's resolution is a near-tie that rounding decides, not a wrong rule."""
    differ = (tokens != reference)[0].nonzero()
    if differ.numel() == 0:
        return "same"
    first = int(differ[0])
    top2 = model(reference[:, :first])[0, -1].float().topk(2).values
    return f"differs from new token {first - prompt_len} (top-2 logit gap {float(top2[0] - top2[1]):.2g})"


def load_model(preset: str, device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> torch.nn.Module:
    """The preset's GPT with random weights, or with --checkpoint's (a state_dict, or a train_char_lm.py
    checkpoint {"model": "gpt", "config", "state_dict"} whose config overrides the preset's)."""
    if args.checkpoint is None:
        return build_model(preset, device, dtype, args.seed)
    checkpoint = torch.load(args.checkpoint, map_location=device, weights_only=True)
    overrides = {}
    if "state_dict" in checkpoint:
        if checkpoint.get("model") != "gpt":
            raise ValueError(f"--checkpoint {args.checkpoint} holds a {checkpoint.get('model')!r} model; GPT only")
        overrides, checkpoint = checkpoint["config"], checkpoint["state_dict"]
    model = build_model(preset, device, dtype, args.seed, **overrides)
    model.load_state_dict(checkpoint)
    return model


def make_prompt(path: Path | None, vocab_size: int, context: int, device: torch.device) -> torch.Tensor:
    """[1, context] ids: random, or the first bytes of the validation split (last 10%) of a text file."""
    if path is None:
        return torch.randint(0, vocab_size, (1, context), device=device)
    data = Path(path).read_bytes()
    text = data[int(0.9 * len(data)) :][:context]
    if len(text) < context or max(text) >= vocab_size:
        raise ValueError(f"--prompt-data {path}: needs {context} validation bytes, each < vocab size {vocab_size}")
    return torch.tensor(list(text), device=device).unsqueeze(0)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    setup_logging()
    device = run_device(args.smoke)
    dtype = run_dtype(args.dtype, args.smoke)
    presets = args.preset or (["tiny"] if args.smoke else ["d20", "paper-0.5b"])
    context, new = args.context or (8 if args.smoke else 512), args.new_tokens or (8 if args.smoke else 128)
    inner = "eager" if args.smoke else "inductor"
    doc = {"question": "speculative", "env": environment(device), "rows": [], "settings": vars(args) | {"inner": inner}}
    compiled = not args.smoke  # sequential decoding through inductor on GPU
    for preset in presets:
        model = load_model(preset, device, dtype, args)
        n_layer = model.config.n_layer
        n_par = args.n_par or n_layer
        config = SNLPConfig(n_seq=n_layer - n_par, iters=args.iters, inner=inner, cudagraphs=device.type == "cuda")
        prompt = make_prompt(args.prompt_data, model.config.vocab_size, context, device)

        cache = StaticKVCache(model.config, 1, context + new - 1, dtype=dtype, device=device)

        def run(mode: str, draft_len: int = 4, prompt=prompt, model=model, config=config, cache=cache):
            # one cache for every generation: CUDA graphs recorded in the warm-up replay in the timed run
            return generate(
                model, prompt, new, config, mode=mode, draft_len=draft_len, compile_sequential=compiled, kv_cache=cache
            )

        reference, seconds = timed_once(lambda run=run: run("sequential"), device)
        rows = [dict(preset=preset, mode="sequential", draft_len=None, seconds=seconds, exact="same", acceptance=None)]
        out, seconds = timed_once(lambda run=run: run("snlp"), device)
        exact = divergence(model, reference.tokens, out.tokens, context)
        rows.append(dict(preset=preset, mode="snlp", draft_len=None, seconds=seconds, exact=exact, acceptance=None))
        for draft_len in args.draft_len:
            out, seconds = timed_once(lambda run=run, k=draft_len: run("speculative", k), device)
            rows.append(
                dict(
                    preset=preset,
                    mode="speculative",
                    draft_len=draft_len,
                    seconds=seconds,
                    exact=divergence(model, reference.tokens, out.tokens, context),
                    acceptance=out.stats.acceptance_rate,
                    draft_s=out.stats.phase_seconds["draft"],
                    verify_s=out.stats.phase_seconds["verify"],
                )
            )
        for row in rows:
            row.update(tokens_per_s=new / row["seconds"], speedup=rows[0]["seconds"] / row["seconds"], n_par=n_par)
            row["weights"] = str(args.checkpoint) if args.checkpoint else "random"
        doc["rows"].extend(rows)
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "speculative.json", doc)
    headers = ["preset", "mode", "draft", "tok/s", "x sequential", "acceptance", "draft / verify / rest %"]
    headers.append("same tokens as sequential")
    cells = [
        [
            r["preset"],
            r["mode"],
            str(r["draft_len"] or "-"),
            f"{r['tokens_per_s']:.1f}",
            f"{r['speedup']:.2f}",
            "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}",
            _split(r),
            r["exact"],
        ]
        for r in doc["rows"]
    ]
    print(format_table(headers, cells))
    return doc


def _split(row: dict) -> str:
    """A speculative row's draft / verify / other time in % of its wall time ("-" for other modes)."""
    if "draft_s" not in row:
        return "-"
    parts = [row["draft_s"], row["verify_s"]]
    parts.append(row["seconds"] - sum(parts))
    return " / ".join(f"{100 * part / row['seconds']:.0f}" for part in parts)


if __name__ == "__main__":
    main()
