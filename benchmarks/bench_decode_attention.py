"""Decode attention: the split-KV Triton kernels of `snlp::decode_attention` against PyTorch's SDPA (cuDNN).

    python3 benchmarks/bench_decode_attention.py --preset d20 paper-0.5b --context 512 --out OUT [--sweep]

Per preset, one decode token attends over a static KV cache of context + 45 slots (as
bench_decode's cache) with the boolean mask the models pass, for one layer (a sequential layer:
batch x heads rows) and for the n_par stack at once (SNLP's block: n_par x batch x heads rows).
Each variant is captured in a CUDA graph over enough distinct caches to defeat the L2 cache.
`--sweep` also times a grid of launch configurations (the data behind `decode_tiles`). Prints a
table; writes decode_attention.json and decode_attention.png.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.grids import headline_n_par
from benchmarks.harness import kernel_parser, measure_kernels, parse_gpu_args
from benchmarks.plot import plot_paired_bars
from benchmarks.report import kernel_table
from benchmarks.timing import graph_time_us, l2_defeating_copies, launch_sweep
from snlp_compile.kernels.attention import reference_attention
from snlp_compile.kernels.decode_attention import DecodeTiles, decode_tiles, triton_decode_attention
from snlp_compile.models import GPTConfig

_SWEEP = [DecodeTiles(s, w, st) for s, w, st in itertools.product((64, 128, 256, 640), (2, 4, 8), (1, 2, 3))]


def measure(row: dict[str, Any], sweep: bool, dtype: torch.dtype) -> dict[str, Any]:
    """SDPA against the split-KV kernel (its own tiles, and with `sweep` the best of _SWEEP) on one problem."""
    rows, heads, keys, dim = row["rows"], row["heads"], row["keys"], row["head_dim"]
    nbytes = 2 * rows * keys * dim * torch.finfo(dtype).bits // 8
    copies = l2_defeating_copies(nbytes)
    shape = (rows // heads, heads, keys, dim)
    caches = [(torch.randn(shape, device="cuda", dtype=dtype), torch.randn(shape, device="cuda", dtype=dtype))]
    caches += [tuple(torch.randn_like(t) for t in caches[0]) for _ in range(copies - 1)]
    q = torch.randn(rows // heads, heads, 1, dim, device="cuda", dtype=dtype)
    mask = torch.arange(keys, device="cuda")[None, :] <= row["context"]  # filled slots up to the new token
    ref = reference_attention(q, *caches[0], mask, False, None).float()
    err = ((triton_decode_attention(q, *caches[0], mask, None).float() - ref).norm() / ref.norm()).item()

    def triton_time(tiles: DecodeTiles) -> float:
        return graph_time_us(lambda i: triton_decode_attention(q, *caches[i % copies], mask, None, tiles), copies)

    sdpa_us = graph_time_us(lambda i: F.scaled_dot_product_attention(q, *caches[i % copies], attn_mask=mask), copies)
    tiles = decode_tiles(rows, keys)
    out = dict(row, mbytes=nbytes / 1e6, sdpa_us=sdpa_us, triton_us=triton_time(tiles), tiles=list(tiles), rel_err=err)
    if sweep:
        out.update(launch_sweep(triton_time, _SWEEP))
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    labels = [f"{r['preset']} {r['where']} ({r['rows']} rows)" for r in rows]
    series = [
        ("SDPA (cuDNN)", [r["sdpa_us"] for r in rows], "tab:gray"),
        ("Triton split-KV", [r["triton_us"] for r in rows], "tab:blue"),
    ]
    title = "Decode attention, 1 query token over the KV cache"
    plot_paired_bars(labels, series, path, "us per call (CUDA graph)", title)


def problems(presets: list[str], context: int, batch: int) -> Iterator[dict[str, Any]]:
    """Per preset: one decode token's attention for one layer and for the headline n_par stack at once."""
    for preset in presets:
        config = GPTConfig.preset(preset)
        n_par = headline_n_par(preset)
        for where, layers in (("one layer", 1), (f"{n_par} layers", n_par)):
            row = dict(preset=preset, where=where, heads=config.n_head, head_dim=config.head_dim)
            row.update(rows=layers * batch * config.n_head, keys=context + 45, context=context)
            yield row


def cells(row: dict[str, Any]) -> list[str]:
    """The table cells of one measured row."""
    cell = [row["preset"], row["where"], str(row["rows"]), str(row["keys"]), f"{row['mbytes']:.1f}"]
    cell += [f"{row['sdpa_us']:.2f}", f"{row['triton_us']:.2f}", str(tuple(row["tiles"])), f"{row['rel_err']:.1e}"]
    return cell


def main() -> None:
    parser = kernel_parser(__doc__, "also time a grid of launch configurations")
    parser.add_argument("--context", type=int, default=512, help="tokens already in the cache")
    parser.add_argument("--batch", type=int, default=1)
    args = parse_gpu_args(parser)
    if args.context < 1 or args.batch < 1:
        parser.error("--context and --batch must be >= 1")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    doc = measure_kernels(
        "decode_attention",
        args.out,
        settings,
        problems(args.preset, args.context, args.batch),
        lambda row: measure(row, args.sweep, torch.bfloat16),
    )
    headers = ["preset", "where", "rows", "keys", "MB", "SDPA us", "Triton us", "tiles", "rel err"]
    print(kernel_table(doc["rows"], headers, cells, args.sweep))
    plot(doc["rows"], args.out / "decode_attention.png")


if __name__ == "__main__":
    main()
