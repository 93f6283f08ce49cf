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

import argparse
import itertools
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    SWEEP_HEADERS,
    environment,
    format_table,
    graph_time_us,
    headline_n_par,
    l2_defeating_copies,
    launch_sweep,
    setup_logging,
    sweep_cells,
    write_json,
)
from benchmarks.plot import plot_paired_bars
from snlp_compile.kernels.attention import reference_attention
from snlp_compile.kernels.decode_attention import DecodeTiles, decode_tiles, triton_decode_attention
from snlp_compile.models import GPTConfig

logger = logging.getLogger("snlp_compile")

_SWEEP = [DecodeTiles(s, w, st) for s, w, st in itertools.product((64, 128, 256, 640), (2, 4, 8), (1, 2, 3))]


def measure(row: dict[str, Any], sweep: bool, dtype: torch.dtype) -> dict[str, Any]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=["d20", "paper-0.5b"])
    parser.add_argument("--context", type=int, default=512, help="tokens already in the cache")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sweep", action="store_true", help="also time a grid of launch configurations")
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args()
    setup_logging()
    if not torch.cuda.is_available():
        parser.error("bench_decode_attention.py times CUDA kernels and needs a GPU")
    if args.context < 1 or args.batch < 1:
        parser.error("--context and --batch must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    doc = dict(question="decode_attention", env=environment(torch.device("cuda")), settings=vars(args), rows=[])
    doc["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in doc["settings"].items()}
    for preset in args.preset:
        config = GPTConfig.preset(preset)
        n_par = headline_n_par(preset)
        for where, layers in (("one layer", 1), (f"{n_par} layers", n_par)):
            row = dict(preset=preset, where=where, heads=config.n_head, head_dim=config.head_dim)
            row.update(rows=layers * args.batch * config.n_head, keys=args.context + 45, context=args.context)
            doc["rows"].append(measure(row, args.sweep, torch.bfloat16))
            logger.info("decode attention %s", doc["rows"][-1])
            write_json(args.out / "decode_attention.json", doc)
            torch.cuda.empty_cache()
    headers = ["preset", "where", "rows", "keys", "MB", "SDPA us", "Triton us", "tiles", "rel err"]
    if args.sweep:
        headers += SWEEP_HEADERS
    cells = []
    for r in doc["rows"]:
        cell = [r["preset"], r["where"], str(r["rows"]), str(r["keys"]), f"{r['mbytes']:.1f}"]
        cell += [f"{r['sdpa_us']:.2f}", f"{r['triton_us']:.2f}", str(tuple(r["tiles"])), f"{r['rel_err']:.1e}"]
        if args.sweep:
            cell += sweep_cells(r)
        cells.append(cell)
    print(format_table(headers, cells))
    plot(doc["rows"], args.out / "decode_attention.png")


if __name__ == "__main__":
    main()
