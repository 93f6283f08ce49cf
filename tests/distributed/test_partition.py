"""partition(): contiguous runs of whole super-layers per rank, uneven where they must be, and clear errors."""

import itertools

import pytest

from snlp_compile import SNLPConfig
from snlp_compile.distributed import partition

SHAPES = [  # (layers, n_seq, fuse, ranks) with at least one super-layer per rank
    (L, n_seq, fuse, world)
    for L, n_seq, fuse, world in itertools.product((5, 8), (0, 1), (1, 2, 3), (1, 2, 3))
    if -(-(L - n_seq) // fuse) >= world
]


@pytest.mark.parametrize("num_layers, n_seq, fuse, world", SHAPES)
def test_ranks_hold_contiguous_runs_of_whole_super_layers_covering_the_block(num_layers, n_seq, fuse, world):
    parts = partition(num_layers, SNLPConfig(n_seq=n_seq, fuse=fuse), world)
    assert parts.world_size == world and parts.n_seq == n_seq and sum(parts.sizes) == num_layers - n_seq
    assert list(parts.sizes[:-1]) == [fuse] * (len(parts.sizes) - 1)  # the schedule's super-layers
    layers = [parts.layers(rank) for rank in range(world)]
    assert [i for r in layers for i in r] == list(range(n_seq, num_layers))
    ends = set(itertools.accumulate(parts.sizes))
    for rank, held in enumerate(layers):
        assert len(held) == sum(parts.local_sizes(rank)) >= 1 and (held.stop - n_seq) in ends
    assert max(parts.groups_per_rank) - min(parts.groups_per_rank) <= 1  # as even as the super-layers allow


def test_explicit_uneven_split():
    parts = partition(7, SNLPConfig(n_seq=1, fuse=2), 2, layers_per_rank=[2, 4])
    assert parts.sizes == (2, 2, 2) and parts.groups_per_rank == (1, 2)
    assert parts.layers(0) == range(1, 3) and parts.layers(1) == range(3, 7)
    assert partition(5, SNLPConfig(), 3, layers_per_rank=(1, 3, 1)).groups_per_rank == (1, 3, 1)


@pytest.mark.parametrize(
    "num_layers, config, world, counts, message",
    [
        (8, SNLPConfig(blocks=2), 2, None, "SNLPConfig.blocks must be 1"),
        (4, SNLPConfig(fuse=2), 3, None, "2 super-layers"),
        (5, SNLPConfig(n_seq=3), 3, None, "each rank needs at least one"),
        (6, SNLPConfig(fuse=2), 2, [1, 5], "super-layer end"),
        (6, SNLPConfig(), 2, [2, 3], "summing to the 6 parallel layers"),
        (6, SNLPConfig(), 2, [0, 6], "integers >= 1"),
        (6, SNLPConfig(), 2, [6], "2 integers"),
        (4, SNLPConfig(n_seq=4), 1, None, "n_seq must be < the number of layers"),
    ],
)
def test_configurations_that_cannot_be_split_are_value_errors(num_layers, config, world, counts, message):
    with pytest.raises(ValueError, match=message):
        partition(num_layers, config, world, counts)
