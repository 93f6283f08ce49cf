"""A trained checkpoint as a few parts small enough to come back from the GPU machine and travel to it.

The device machine returns at most 8 files of 16 MiB from a call, and its checkpoints are lost when
it is given back; a 32-layer model (50 MB in bf16) fits in 4 parts. `split` writes the checkpoint
(its floating tensors cast to --dtype, e.g. bfloat16, what the evaluation runs in) as
DIR/model.pt.partNN plus DIR/model.pt.sha256 (the digest of the whole); `join` checks the digest and
writes the checkpoint back, loadable by examples/eval_snlp.py and benchmarks/bench_speculative.py.

    python3 benchmarks/checkpoint_parts.py split runs/deep/gpt_reg_w4/model.pt $OUT/gpt_reg_w4
    python3 benchmarks/checkpoint_parts.py join carried/gpt_reg_w4 runs/deep/gpt_reg_w4/model.pt
"""

from __future__ import annotations

import argparse
import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.variants import DTYPES

NAME = "model.pt"


def split(checkpoint: Path, out: Path, max_mib: float = 15.0, dtype: torch.dtype = torch.bfloat16) -> list[Path]:
    """Write `checkpoint` as parts of at most `max_mib` MiB and a digest into `out`; returns the parts."""
    if not max_mib > 0:
        raise ValueError(f"max_mib must be > 0, got {max_mib}")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    weights = state.get("state_dict", state)
    for name, tensor in weights.items():
        if tensor.is_floating_point():
            weights[name] = tensor.to(dtype)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    size = max(1, int(max_mib * 2**20))
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{NAME}.part*"):
        stale.unlink()
    parts = []
    for index, start in enumerate(range(0, len(data), size)):
        parts.append(out / f"{NAME}.part{index:02d}")
        parts[-1].write_bytes(data[start : start + size])
    (out / f"{NAME}.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    return parts


def join(parts_dir: Path, checkpoint: Path) -> Path:
    """Reassemble the parts in `parts_dir` into `checkpoint`; ValueError when a part is missing or changed."""
    parts = sorted(parts_dir.glob(f"{NAME}.part*"))
    digest_file = parts_dir / f"{NAME}.sha256"
    if not parts or not digest_file.exists():
        raise ValueError(f"{parts_dir} holds no {NAME}.partNN files with their {NAME}.sha256")
    data = b"".join(part.read_bytes() for part in parts)
    expected = digest_file.read_text().strip()
    if hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(f"{parts_dir}: the {len(parts)} parts do not add up to the checkpoint of digest {expected}")
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(data)
    return checkpoint


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_parts = commands.add_parser("split", help="CHECKPOINT -> DIR/model.pt.partNN + DIR/model.pt.sha256")
    to_parts.add_argument("checkpoint", type=Path)
    to_parts.add_argument("out", type=Path)
    to_parts.add_argument("--max-mib", type=float, default=15.0, help="largest part (MiB)")
    to_parts.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="of the floating tensors")
    from_parts = commands.add_parser("join", help="DIR of parts -> CHECKPOINT")
    from_parts.add_argument("parts", type=Path)
    from_parts.add_argument("checkpoint", type=Path)
    args = parser.parse_args(argv)
    if args.command == "split":
        parts = split(args.checkpoint, args.out, args.max_mib, DTYPES[args.dtype])
        print(f"{args.checkpoint} -> {len(parts)} parts in {args.out}")
    else:
        print(f"{args.parts} -> {join(args.parts, args.checkpoint)}")


if __name__ == "__main__":
    main()
