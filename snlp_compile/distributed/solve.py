"""The SNLP solve of one Newton block whose super-layers are split over the ranks of a process group.

Rank r holds the super-layers a..b-1 of the block (`Partition.groups`) and keeps their inputs
u_a..u_{b-1}, and u_b, the input of the next rank's first one. One iteration on rank r:

1. y_g = F_g(u_g) for its super-layers and r_g = y_g - u_{g+1} (a NaN residual counts as 0, as in
   `solver.core`);
2. its carries p_g with no change entering (p_a = 0, p_{g+1} = c A_{g+1} (p_g + r_g)), and from them
   its partials: s = p_{b-1} + r_{b-1}, the change it passes to u_b; z = y_{b-1} + p_{b-1}, the new
   u_b; M = c^n A_{b-1} ... A_a, how a change e entering its range moves both (s + M e, z + M e);
3. ONE all-gather of every rank's (M, s, z), after which every rank scans them in rank order
   (E_0 = 0, E_{j+1} = s_j + M_j E_j): its entering change E_r, its new first input
   u_a = z_{r-1} + M_{r-1} E_{r-1}, and the block output z_{R-1} + M_{R-1} E_{R-1}, the same on every rank
   (the same gathered bytes, the same operations);
4. its carries again from p_a = c A_a E_r, and u_{g+1} = y_g + p_g: each input is its predecessor's
   output plus a correction, as in `solver.core`.

Invariants: the output equals `solver.solve` of the whole block up to float rounding (the sums run
in another order), for every surrogate, damping and init, so it is exact after `exact_iters`
iterations; with the identity surrogate and no damping nothing but the sums travels (M = I), and
one iteration from init "h0" is the prefix-sum formula out = y_C + sum_g r_g.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import SNLPConfig
from ..solver import LayerStack, Surrogate, exact_iters
from ..solver.core import _carries, _super_layers
from .exchange import Exchange
from .partition import Partition


class BlockSolve:
    """The rank's part of one block's solve for one call: `run(x)` returns the block output on every rank."""

    def __init__(self, local: LayerStack, partition: Partition, exchange: Exchange, config: SNLPConfig):
        self.local, self.exchange, self.config = local, exchange, config
        self.rank, self.last = exchange.rank, exchange.rank == exchange.size - 1
        self.sizes = partition.local_sizes(self.rank)
        self.iters = min(config.iters, exact_iters(len(partition.sizes), config.init))
        self.c = 1.0 - config.damping
        self.whole = local.surrogate.compose(self.sizes)[1]  # A_g of the rank's super-layers
        self.plain = self.whole.kind == "identity" and self.c == 1.0  # M = I: only the sums travel

    def _transfer(self, like: Tensor) -> Tensor:
        """M = c^n A_{b-1} ... A_a: [1] (scale) or [1, M, M] (mix); a damped identity is the scale c^n."""
        n = len(self.sizes)
        if self.whole.kind == "identity":
            return torch.full((1,), self.c**n, dtype=like.dtype, device=like.device)
        damped = Surrogate(self.whole.kind, self.whole.values * self.c, self.whole.stream)
        return damped.compose([n])[1].values

    def _moved(self, matrix: Tensor | None, e: Tensor) -> Tensor:
        """M e for one rank's gathered M (None: M = I)."""
        if matrix is None:
            return e
        kind = "scale" if self.whole.kind == "identity" else self.whole.kind
        return Surrogate(kind, matrix, self.whole.stream).apply(e.unsqueeze(0))[0]

    def _carries(self, r: Tensor, first: Tensor) -> Tensor:
        """p_a .. p_{b-1} from p_a = `first` (the residuals r_a .. r_{b-2} feed them)."""
        n = len(self.sizes)
        if self.plain:
            return torch.cat([first.unsqueeze(0), first + torch.cumsum(r[: n - 1], dim=0)])
        return torch.stack(list(_carries(self.whole, self.c, r[: n - 1], first)))

    def _initial_inputs(self, x: Tensor) -> Tensor:
        """u_a .. u_{b-1} (and u_b unless last) of iteration 1: all x ("h0"), or each super-layer's
        output at x ("batch_fwd": u_{g+1} = F_g(x); u_a from the previous rank, in one all-gather)."""
        u = x.unsqueeze(0).expand(len(self.sizes) + (not self.last), *x.shape)
        if self.config.init != "batch_fwd":
            return u
        evaluated = len(self.sizes) - self.last  # the block's last super-layer is not evaluated at x
        outputs = _super_layers(self.local, 0, self.sizes[:evaluated], u[:evaluated]) if evaluated else u[:0]
        gathered = self.exchange.gather([outputs[-1] if evaluated else x], "the batch_fwd initialisation")
        first = x if self.rank == 0 else gathered[self.rank - 1][0]
        return torch.cat([first.unsqueeze(0), outputs])

    def _scan(self, gathered: list[list[Tensor]], zero: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """(E_r, u_a (None on rank 0), the block output) from every rank's (s, z[, M]), in rank order."""
        last = len(gathered) - 1
        e, entering, first_input, out = zero, zero, None, zero
        for j, (s_j, z_j, *m_j) in enumerate(gathered):
            moved = self._moved(m_j[0] if m_j else None, e)  # M_j E_j
            if j == self.rank:
                entering = e
            if j == self.rank - 1:
                first_input = z_j + moved
            if j == last:
                out = z_j + moved
            else:
                e = s_j + moved
        return entering, first_input, out

    def run(self, x: Tensor) -> Tensor:
        """The block output after `iters` iterations, from the block input x (the same on every rank)."""
        u, n, zero = self._initial_inputs(x), len(self.sizes), torch.zeros_like(x)
        matrix = None if self.plain else self._transfer(x)
        for k in range(1, self.iters + 1):
            outputs = _super_layers(self.local, 0, self.sizes, u[:n])
            r = torch.nan_to_num(outputs[: u.shape[0] - 1] - u[1:], nan=0.0, posinf=math.inf, neginf=-math.inf)
            p = self._carries(r, zero)
            s = zero if self.last else p[-1] + r[-1]  # the last rank passes nothing on
            pieces = [s, outputs[-1] + p[-1], *([] if matrix is None else [matrix])]
            entering, first_input, out = self._scan(self.exchange.gather(pieces, f"Newton iteration {k}"), zero)
            if k < self.iters:
                if self.rank > 0:
                    p = self._carries(r, self.c * self.whole[:1].apply(entering.unsqueeze(0))[0])
                first = x if first_input is None else first_input
                u = torch.cat([first.unsqueeze(0), (outputs + p)[: u.shape[0] - 1]])
        return out
