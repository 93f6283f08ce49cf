"""Building blocks shared by GPT and MHCGPT: norm, rotary embeddings, attention, MLP."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snlp_compile.models.config import GPTConfig

if TYPE_CHECKING:
    from snlp_compile.models.kv_cache import StaticKVCache


def rms_norm(x: Tensor) -> Tensor:
    """Parameter-free RMSNorm over the last dim."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """Rotary (cos, sin) tables, each float32 [seq_len, head_dim // 2]."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, T, H, D] by cos/sin [T, D/2] (broadcast over B and H), nanochat style."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


def attention_mask(q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """Boolean mask [T, S]: True iff k_pos <= q_pos and q_pos - k_pos < window."""
    diff = q_pos[:, None] - k_pos[None, :]
    mask = diff >= 0
    if window is not None:
        mask = mask & (diff < window)
    return mask


class CausalSelfAttention(nn.Module):
    """Causal (optionally sliding-window) attention with rotary, QK-norm and GQA; no biases."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.window = config.window_for_layer(layer_idx)
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d, kv = config.n_embd, config.n_kv_head * config.head_dim
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, kv, bias=False)
        self.c_v = nn.Linear(d, kv, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, kv_cache: StaticKVCache | None = None
    ) -> Tensor:
        """x [B, T, d]; cos/sin [T, D/2] already indexed at ``positions`` [T] (absolute positions)."""
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = rms_norm(q), rms_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        if kv_cache is None:
            key_pos = positions
        else:  # attend over the whole static cache; unfilled slots are masked as "future"
            k, v = kv_cache.update(self.layer_idx, k, v, positions)
            k, v = k.to(q.dtype), v.to(q.dtype)
            key_pos = torch.arange(k.size(2), device=positions.device)
        if self.n_kv_head != self.n_head:
            group = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if kv_cache is None and (self.window is None or self.window >= T):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = attention_mask(positions, key_pos, self.window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """d -> 4d -> d with relu(x)**2; no biases."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())
