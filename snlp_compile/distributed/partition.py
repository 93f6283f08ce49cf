"""Which parallel layers each rank of a depth-parallel solve holds and evaluates.

Invariants of a `Partition`: the parallel layers (those after the n_seq sequential ones) form one
Newton block (config.blocks == 1), cut into the super-layers of `solver.schedule`; each rank holds a
contiguous run of whole super-layers (at least one), in rank order, and together they hold every one;
counts may differ between ranks.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import SNLPConfig, check_int
from ..solver import schedule, split_even


@dataclass(frozen=True)
class Partition:
    """The one Newton block's super-layer sizes and how many of them each rank holds."""

    n_seq: int
    sizes: tuple[int, ...]  # super-layer sizes of the block, in order
    groups_per_rank: tuple[int, ...]

    @property
    def world_size(self) -> int:
        return len(self.groups_per_rank)

    def groups(self, rank: int) -> range:
        """The super-layers (indices into `sizes`) that `rank` holds."""
        start = sum(self.groups_per_rank[:rank])
        return range(start, start + self.groups_per_rank[rank])

    def local_sizes(self, rank: int) -> list[int]:
        """The sizes of the super-layers `rank` holds."""
        return [self.sizes[g] for g in self.groups(rank)]

    def layers(self, rank: int) -> range:
        """The layers (stack positions) that `rank` holds, a contiguous range after the n_seq sequential ones."""
        groups = self.groups(rank)
        start = self.n_seq + sum(self.sizes[: groups.start])
        return range(start, start + sum(self.sizes[groups.start : groups.stop]))


def partition(
    num_layers: int, config: SNLPConfig, world_size: int, layers_per_rank: Sequence[int] | None = None
) -> Partition:
    """Split the parallel layers of a stack of `num_layers` over `world_size` ranks.

    layers_per_rank: the parallel layers of each rank (each a whole number of super-layers, summing to
    num_layers - n_seq); None: the super-layers split as evenly as they go, the first ranks taking one
    more. ValueError when the configuration cannot be split (blocks > 1, fewer super-layers than ranks).
    """
    check_int("world_size", world_size, 1)
    if config.blocks != 1:
        raise ValueError(
            "depth_parallel splits one Newton block across the ranks: SNLPConfig.blocks must be 1, got "
            f"{config.blocks} (blocks solved one after another would leave the ranks of the other blocks idle)"
        )
    ((first, sizes),) = schedule(num_layers, config)
    if len(sizes) < world_size:
        raise ValueError(
            f"the Newton block has {len(sizes)} super-layers ({num_layers - first} parallel layers, "
            f"fuse={config.fuse}) and the process group {world_size} ranks: each rank needs at least one; use "
            "fewer ranks, a smaller n_seq or a smaller fuse"
        )
    if layers_per_rank is None:
        return Partition(first, tuple(sizes), tuple(split_even(len(sizes), world_size)))
    counts = list(layers_per_rank)
    ends = set(itertools.accumulate(sizes))
    cuts = list(itertools.accumulate(counts))
    if (
        len(counts) != world_size
        or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts)
        or cuts[-1] != sum(sizes)
        or not set(cuts) <= ends
    ):
        raise ValueError(
            f"layers_per_rank must be {world_size} integers >= 1 summing to the {sum(sizes)} parallel layers, each "
            f"rank's run ending at a super-layer end (super-layer sizes {sizes}), got {counts}"
        )
    ends_sorted = sorted(ends)
    groups = [ends_sorted.index(cut) + 1 for cut in cuts]
    return Partition(first, tuple(sizes), tuple(b - a for a, b in itertools.pairwise([0, *groups])))
