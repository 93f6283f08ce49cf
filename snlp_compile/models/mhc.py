"""Manifold-constrained hyper-connections (mHC) GPT: M residual streams, doubly stochastic mixing."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from snlp_compile.models.config import GPTConfig
from snlp_compile.models.gpt import DecoderLM
from snlp_compile.models.kv_cache import StaticKVCache
from snlp_compile.models.layers import MLP, CausalSelfAttention, rms_norm


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """Doubly stochastic matrix from logits [..., M, M]: exp, then ``iters`` row/column normalisations."""
    p = (logits - logits.amax(dim=(-2, -1), keepdim=True)).exp()
    for _ in range(iters):
        p = p / p.sum(dim=-1, keepdim=True)
        p = p / p.sum(dim=-2, keepdim=True)
    return p


class HyperConnection(nn.Module):
    """Wraps one sublayer f: h <- H_res @ h + post * f(norm(pre @ h)), h of shape [B, T, M, d]."""

    def __init__(self, n_streams: int, sinkhorn_iters: int) -> None:
        super().__init__()
        self.sinkhorn_iters = sinkhorn_iters
        m = n_streams
        # Identity-biased with noise: H_res near, but not equal to, the identity; pre/post non-uniform.
        self.res_logits = nn.Parameter(2.0 * torch.eye(m) + 0.1 * torch.randn(m, m))
        self.pre_logits = nn.Parameter(0.5 * torch.randn(m))
        self.post_logits = nn.Parameter(0.5 * torch.randn(m))

    def forward(self, h: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        h_res = sinkhorn(self.res_logits, self.sinkhorn_iters)
        pre, post = self.pre_logits.softmax(-1), self.post_logits.softmax(-1)
        y = sublayer(rms_norm(pre @ h))  # [B, T, d]
        return h_res @ h + post[:, None] * y.unsqueeze(-2)


class MHCBlock(nn.Module):
    """Attention and MLP sublayers, each wrapped in a HyperConnection."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)
        self.hc_attn = HyperConnection(config.n_streams, config.sinkhorn_iters)
        self.hc_mlp = HyperConnection(config.n_streams, config.sinkhorn_iters)

    def forward(
        self, h: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, kv_cache: StaticKVCache | None = None
    ) -> Tensor:
        h = self.hc_attn(h, lambda x: self.attn(x, cos, sin, positions, kv_cache))
        return self.hc_mlp(h, self.mlp)


class MHCGPT(DecoderLM):
    """GPT whose hidden state is [B, T, M, d] (M = config.n_streams); streams are summed before the head."""

    block_cls = MHCBlock

    def expand(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        return x.unsqueeze(-2).expand(B, T, self.config.n_streams, d).contiguous()

    def collapse(self, x: Tensor) -> Tensor:
        return x.sum(dim=-2)
