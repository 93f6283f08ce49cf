"""Decode GEMVs: the Triton kernel of `snlp::linear` against cuBLAS at every linear shape of a preset.

    python3 benchmarks/bench_gemv.py --preset d20 paper-0.5b --out OUT [--sweep]

For each preset the shapes are its layers' linears as one stack of the parallel layers (n_par) and
as one layer (the sequential layers), plus the LM head, at 1 token per layer (batch 1 decode).
Each variant is captured in a CUDA graph that calls it on enough distinct weight copies to defeat
the L2 cache (as a decode step reads every layer's own weights once), so the time per call is
what a CUDA-graphed decode step pays. `--sweep` also times a grid of tile configurations and
reports the best, the data behind `gemv_tiles`. Prints a table; writes gemv.json and gemv.png.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.grids import headline_n_par
from benchmarks.harness import kernel_parser, measure_kernels, parse_gpu_args
from benchmarks.plot import plot_paired_bars
from benchmarks.report import kernel_table
from benchmarks.timing import graph_time_us, l2_defeating_copies, launch_sweep
from snlp_compile.kernels.stacked_linear import GemvTiles, gemv_tiles, triton_stacked_linear
from snlp_compile.models import GPTConfig

_SWEEP = [
    GemvTiles(n, k, w, s) for n, k, w, s in itertools.product((16, 32, 64, 128), (64, 128, 256), (4, 8), (3, 4, 6))
]


def shapes(preset: str, n_par: int) -> list[dict[str, Any]]:
    """Every decode linear of the preset as (name, layers, widths N_i, K), for the n_par stack and one
    layer, plus the LM head; q, k and v are siblings of one input (one launch of the kernel)."""
    config = GPTConfig.preset(preset)
    d, kv, vocab = config.n_embd, config.n_kv_head * config.head_dim, config.vocab_size
    per_layer = {"q+k+v": ([d, kv, kv], d), "o": ([d], d), "mlp in": ([4 * d], d), "mlp out": ([d], 4 * d)}
    rows = [
        dict(preset=preset, linear=name, layers=layers, n=widths, k=k)
        for layers in (n_par, 1)
        for name, (widths, k) in per_layer.items()
    ]
    rows.append(dict(preset=preset, linear="lm head", layers=1, n=[vocab], k=d))
    return rows


def measure(row: dict[str, Any], sweep: bool, dtype: torch.dtype) -> dict[str, Any]:
    """cuBLAS (one call per weight, as a sequential model runs them) against the Triton kernel (one launch)."""
    layers, widths, k = row["layers"], row["n"], row["k"]
    nbytes = layers * sum(widths) * k * torch.finfo(dtype).bits // 8
    copies = l2_defeating_copies(nbytes)
    weights = [[torch.randn(layers, n, k, device="cuda", dtype=dtype) for n in widths] for _ in range(copies)]
    x = torch.randn(layers, 1, k, device="cuda", dtype=dtype)
    ref = torch.cat([torch.bmm(x.float(), w.float().transpose(1, 2)) for w in weights[0]], -1)
    err = (
        torch.cat(triton_stacked_linear(x, weights[0]), -1).float() - ref
    ).abs().max().item() / ref.abs().max().item()

    def cublas(i: int) -> None:
        for w in weights[i % copies]:
            if layers == 1:
                F.linear(x[0], w[0])
            else:
                torch.bmm(x, w.transpose(1, 2))

    def triton_time(tiles: GemvTiles) -> float:
        return graph_time_us(lambda i: triton_stacked_linear(x, weights[i % copies], tiles), copies)

    cublas_us = graph_time_us(cublas, copies)
    tiles = gemv_tiles(layers, sum(widths), k)
    triton_us = triton_time(tiles)
    out = dict(row, mbytes=nbytes / 1e6, cublas_us=cublas_us, triton_us=triton_us, tiles=list(tiles), rel_err=err)
    out["cublas_tbps"], out["triton_tbps"] = nbytes / cublas_us / 1e6, nbytes / triton_us / 1e6
    if sweep:
        out.update(launch_sweep(triton_time, _SWEEP))
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    labels = [f"{r['preset']} {r['linear']} x{r['layers']}" for r in rows]
    series = [
        ("cuBLAS, one call per weight", [r["cublas_tbps"] for r in rows], "tab:gray"),
        ("Triton GEMV, one launch", [r["triton_tbps"] for r in rows], "tab:blue"),
    ]
    xlabel = "weight bytes read per second (TB/s)"
    plot_paired_bars(labels, series, path, xlabel, "Decode GEMV, 1 token per layer, in a CUDA graph")


def cells(row: dict[str, Any]) -> list[str]:
    """The table cells of one measured row."""
    shape = f"{'+'.join(map(str, row['n']))} x {row['k']}"
    cell = [row["preset"], row["linear"], str(row["layers"]), shape, f"{row['mbytes']:.1f}"]
    cell += [f"{row['cublas_us']:.2f}", f"{row['triton_us']:.2f}", f"{row['triton_tbps']:.2f}"]
    return cell + [str(tuple(row["tiles"]))]


def main() -> None:
    parser = kernel_parser(__doc__, "also time a grid of tile configurations")
    parser.add_argument(
        "--n-par", nargs="+", type=int, default=None, help="stack size per preset (default: its headline n_par)"
    )
    args = parse_gpu_args(parser)
    n_par = args.n_par or [headline_n_par(p) for p in args.preset]
    if len(n_par) != len(args.preset):
        parser.error(f"--n-par needs one value per preset ({len(args.preset)}), got {len(n_par)}")
    doc = measure_kernels(
        "gemv",
        args.out,
        dict(dtype="bfloat16"),
        (row for preset, layers in zip(args.preset, n_par, strict=True) for row in shapes(preset, layers)),
        lambda row: measure(row, args.sweep, torch.bfloat16),
    )
    headers = ["preset", "linear", "layers", "N x K", "MB", "cuBLAS us", "Triton us", "Triton TB/s", "tiles"]
    print(kernel_table(doc["rows"], headers, cells, args.sweep))
    plot(doc["rows"], args.out / "gemv.png")


if __name__ == "__main__":
    main()
