"""The SNLP configurations the benchmarks time, per model preset and grid.

A grid is a list of specs in priority order (a time budget cuts the tail): the first is the headline,
the second the exactness check (iters = n_par: `check`), run right after it. Spec keys: n_par (layers
solved in parallel; n_seq = L - n_par), fuse, iters, blocks and init as in SNLPConfig. n_par 1 is the
sequential model through the SNLP backend's own kernels (exact): the control that separates what the
kernels gain from what running layers in parallel gains. Each preset has "headline" and "minimal" (its
first two specs) grids; the large presets also "full" (the headline grid and more).
"""

from __future__ import annotations

from typing import Any

from snlp_compile.models import GPTConfig

Spec = dict[str, Any]


def _grids(headline: list[Spec], more: list[Spec] | None = None) -> dict[str, list[Spec]]:
    """The named grids of a preset: headline, minimal (headline and check) and, with `more`, full."""
    grids = {"headline": headline, "minimal": headline[:2]}
    if more is not None:
        grids["full"] = headline + more
    return grids


_PAPER = [
    dict(n_par=24, iters=1),
    dict(n_par=24, iters=24, check=True),
    dict(n_par=1, iters=1),
    dict(n_par=24, fuse=2, iters=1),
    dict(n_par=12, fuse=12, iters=1),
    dict(n_par=24, iters=2),
    dict(n_par=24, iters=4),
    dict(n_par=24, iters=1, blocks=2),
]
_D20 = [
    dict(n_par=20, iters=1),
    dict(n_par=20, iters=20, check=True),
    dict(n_par=1, iters=1),
    dict(n_par=16, iters=1),
    dict(n_par=20, iters=2),
    dict(n_par=20, iters=1, blocks=2),
    dict(n_par=20, fuse=2, iters=1),
]
_TINY = [
    dict(n_par=4, iters=1),
    dict(n_par=4, iters=4, check=True),
    dict(n_par=2, fuse=2, iters=1),
    dict(n_par=4, iters=2, blocks=2),
]

GRIDS: dict[str, dict[str, list[Spec]]] = {
    "tiny": _grids(_TINY),
    "paper-0.5b": _grids(
        _PAPER,
        [
            dict(n_par=32, iters=1),
            dict(n_par=16, iters=1),
            dict(n_par=24, fuse=4, iters=1),
            dict(n_par=24, iters=1, init="batch_fwd"),
            dict(n_par=24, iters=2, blocks=2),
            dict(n_par=24, iters=1, blocks=3),
        ],
    ),
    "d20": _grids(
        _D20,
        [
            dict(n_par=20, iters=4),
            dict(n_par=10, iters=1),
            dict(n_par=20, fuse=4, iters=1),
            dict(n_par=20, iters=1, init="batch_fwd"),
            dict(n_par=20, iters=2, blocks=2),
        ],
    ),
}
GRID_NAMES = sorted({name for grids in GRIDS.values() for name in grids})


def headline_n_par(preset: str) -> int:
    """Parallel layers of the preset's headline SNLP configuration (all layers for a preset without a grid)."""
    grid = GRIDS.get(preset)
    return grid["headline"][0]["n_par"] if grid else GPTConfig.preset(preset).n_layer
