"""The one collective of each step of a depth-parallel solve: every rank's partial results, gathered
onto every rank.

Invariants: `Exchange.gather(pieces)` returns, for every rank of the group in rank order, that rank's
pieces bit for bit (each in its own dtype and shape: the pieces travel as bytes in one all-gather, so
float32 mixing matrices keep their precision beside bfloat16 states); every rank must call it with
pieces of the same shapes and dtypes. A failed or timed-out collective raises a RuntimeError naming
the rank and the step, never hangs past the process group's timeout.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

_ALIGN = 16  # bytes: every piece starts at a multiple, so that its bytes view as any dtype


def _padded(nbytes: int) -> int:
    return math.ceil(nbytes / _ALIGN) * _ALIGN


def _all_gather(input: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Every rank's `input` [n], concatenated in rank order [size * n]: a functional collective, which
    torch.compile traces into its graph (all_gather_single where this torch has it, else its older
    name all_gather_tensor), waited for here."""
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    return funcol.wait_tensor(gather(input, 0, group))


class Exchange:
    """All-gathers of tensors over a process group (default: the world group)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "depth_parallel needs torch.distributed initialised: launch with torchrun and call "
                "torch.distributed.init_process_group(backend, timeout=...) first (the timeout bounds how long "
                "a rank waits for a failed one)"
            )
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        if self.rank < 0:
            raise ValueError("depth_parallel: this process is not a member of the given process group")

    def gather(self, pieces: list[Tensor], step: str) -> list[list[Tensor]]:
        """[rank][i]: piece i of each rank (`step` names the call in errors)."""
        sizes = [p.numel() * p.element_size() for p in pieces]
        width = sum(_padded(n) for n in sizes)
        device = pieces[0].device
        send = torch.empty(width, dtype=torch.uint8, device=device)
        offset = 0
        for piece, n in zip(pieces, sizes, strict=True):
            send[offset : offset + n].copy_(piece.contiguous().reshape(-1).view(torch.uint8))
            offset += _padded(n)
        try:
            received = _all_gather(send, self.group)
        except RuntimeError as error:  # DistBackendError and the gloo / NCCL timeouts are RuntimeErrors
            raise RuntimeError(
                f"depth_parallel rank {self.rank} of {self.size}: the all-gather of {step} failed; another rank "
                f"failed or stopped answering (the process group's timeout bounds the wait): {error}"
            ) from error
        out = []
        for row in received.view(self.size, width):
            offset, mine = 0, []
            for piece, n in zip(pieces, sizes, strict=True):
                mine.append(row[offset : offset + n].view(piece.dtype).view(piece.shape))
                offset += _padded(n)
            out.append(mine)
        return out
