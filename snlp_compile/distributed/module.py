"""DepthParallel: a decoder whose SNLP solve is split over the ranks of a process group, and
`depth_parallel`, which builds one on each rank.

Invariants: every rank must call `forward` with the same token ids (and caches at the same
position); every rank then returns the same logits, bit for bit (the ranks' partial results travel
in one all-gather per Newton iteration and every rank reduces them alike). The logits are the
single-process solve's (`solver.solve` / the compiled model with the same config) up to float
rounding, so the sequential model's once iters reaches the block's super-layer count. A rank holds
the embedding, the head, the n_seq sequential layers and its own parallel layers, never another
rank's: the sequential layers, the embedding and the head run on every rank (cheap at batch 1).
Inference only: the forward runs without autograd.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import SNLPConfig
from ..models.gpt import DecoderLM
from ..solver import CallableStack, Surrogate
from . import decoder
from .cache import LocalKVCache
from .exchange import Exchange
from .partition import Partition, partition
from .solve import BlockSolve

logger = logging.getLogger("snlp_compile")


class DepthParallel(nn.Module):
    """One rank's part of a depth-parallel decoder; build it with `depth_parallel`.

    `forward(idx, kv_cache=None)` is the decoder's (token ids [B, T] -> float logits [B, T, V],
    advancing the cache by T), with the layer stack solved by SNLP across the group. It meets
    `snlp_compile.decoding.DecodableModel`, with caches of its own layers only (`make_kv_cache`):
    `snlp_compile.generate(dp, prompt, n, mode="sequential")` decodes with it: that mode calls the
    module as it is, and its forward is the depth-parallel solve ("snlp" and "speculative" would
    compile it again). Greedy decoding gives the same tokens on every rank; sampling does where every
    rank seeds its generator alike.
    """

    def __init__(self, model: DecoderLM, parts: Partition, exchange: Exchange, config: SNLPConfig):
        super().__init__()
        self.model, self.partition, self.exchange, self.config = model, parts, exchange, config
        self.parallel_layers = list(parts.layers(exchange.rank))
        self.layers = [*range(parts.n_seq), *self.parallel_layers]  # model.blocks[slot] is layer layers[slot]
        self._surrogate_key: tuple | None = None
        self._surrogate = None
        self.training = False  # inference only; not .eval(), which would reach the shared modules of the model

    @property
    def rank(self) -> int:
        return self.exchange.rank

    @property
    def world_size(self) -> int:
        return self.exchange.size

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def max_seq_len(self) -> int:
        return self.model.max_seq_len

    @property
    def kv_cache_geometry(self) -> dict[str, int]:
        return LocalKVCache.geometry_of(self.model.config) | {"n_layer": len(self.layers)}

    def make_kv_cache(
        self, batch_size: int, max_seq_len: int, device: torch.device | str | None, dtype: torch.dtype
    ) -> LocalKVCache:
        """An empty cache of this rank's layers (the sequential ones and its parallel ones)."""
        return LocalKVCache(self.model.config, self.layers, batch_size, max_seq_len, dtype, device)

    def extra_repr(self) -> str:
        first, last = self.parallel_layers[0], self.parallel_layers[-1]
        return f"rank {self.rank} of {self.world_size}: parallel layers {first}..{last}, {self.config}"

    def _local_surrogate(self) -> Surrogate:
        """J of this rank's parallel layers: recomputed eagerly only when a parameter it comes from
        changed, and in each compiled call (where the compiler fuses it; it has no data pointers)."""
        slots = list(range(self.partition.n_seq, len(self.layers)))
        if torch.compiler.is_compiling():
            return decoder.surrogate(self.model, slots, self.parallel_layers, self.config)
        key = tuple((p.data_ptr(), p._version) for p in decoder.surrogate_inputs(self.model, slots))
        if key != self._surrogate_key:
            self._surrogate = decoder.surrogate(self.model, slots, self.parallel_layers, self.config)
            self._surrogate_key = key
        return self._surrogate

    @torch.no_grad()
    def forward(self, idx: Tensor, kv_cache: LocalKVCache | None = None) -> Tensor:
        """Token ids [B, T] -> float logits [B, T, vocab_size], the same on every rank."""
        if idx.dim() != 2 or idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise ValueError(f"idx must be a 2-D integer tensor [B, T], got {idx.dim()}-D {idx.dtype}")
        if not 1 <= idx.shape[1] <= self.max_seq_len:
            raise ValueError(f"sequence length T must be in [1, {self.max_seq_len}], got {idx.shape[1]}")
        h, call = decoder.embed(self.model, idx, kv_cache)
        for slot in range(self.partition.n_seq):
            h = decoder.layer(self.model, slot, slot, call, h)
        fns = [partial(decoder.layer, self.model, slot, i, call) for slot, i in enumerate(self.layers)]
        local = CallableStack(fns[self.partition.n_seq :], self._local_surrogate())
        h = BlockSolve(local, self.partition, self.exchange, self.config).run(h)
        logits = decoder.head(self.model, h)
        if kv_cache is not None:
            kv_cache.pos.add_(idx.shape[1])
        return logits


def depth_parallel(
    model: nn.Module,
    config: SNLPConfig | Mapping[str, Any] | None = None,
    group: dist.ProcessGroup | None = None,
    *,
    device: torch.device | str | None = None,
    layers_per_rank: Sequence[int] | None = None,
) -> DepthParallel:
    """This rank's DepthParallel of `model`: its SNLP solve with the parallel layers split over `group`.

    Call it on every rank of `group` (default: the world group, which must be initialised; give it a
    timeout, so that a failed rank makes the others raise instead of waiting forever) with the same
    model weights and config. model: a built-in decoder (`snlp_compile.models` GPT or MHCGPT; others:
    TypeError naming what is needed). config: SNLPConfig or its fields; blocks must be 1 (one Newton
    block, cut into contiguous runs of whole super-layers, one run per rank); the compiler options
    (inner, cudagraphs, gemv, ...) do not apply. layers_per_rank: the parallel layers of each rank
    (default: as even as the super-layers allow).

    Each rank runs the embedding, the head and the n_seq sequential layers itself (cheap at batch 1)
    and its own parallel layers, with one all-gather per Newton iteration; it keeps the KV cache of
    those layers only (`make_kv_cache`). torch.compile(result) traces a rank's whole step into one
    graph, the all-gather included (a functional collective).

    Memory: the result holds the embedding, the head, the n_seq sequential layers and this rank's
    parallel layers, nothing of the other ranks' layers. device None: it shares those tensors with
    `model` (no copy; move `model` to its device first, and do not call .to() on the result, which
    would move them); a device: it holds copies there and `model` stays as it is. Either way, `del
    model` afterwards frees the other ranks' layers. The model's weights are never changed.
    """
    config = SNLPConfig.from_options(config)
    decoder.check_decoder(model, config)
    exchange = Exchange(group)
    where = torch.device(device) if device is not None else next(model.parameters()).device
    if dist.get_backend(exchange.group) == "nccl" and where.type != "cuda":
        raise ValueError(f"depth_parallel on an NCCL process group needs the model on a GPU, not {where}: pass device=")
    parts = partition(len(model.blocks), config, exchange.size, layers_per_rank)
    kept = [*range(parts.n_seq), *parts.layers(exchange.rank)]
    result = DepthParallel(decoder.shell(model, kept, device), parts, exchange, config)
    logger.info("snlp: depth parallel %s", result.extra_repr())
    return result
