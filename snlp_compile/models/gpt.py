"""Plain GPT (nanochat style) and the decoder loop shared with MHCGPT."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from snlp_compile.models.config import GPTConfig
from snlp_compile.models.kv_cache import StaticKVCache
from snlp_compile.models.layers import MLP, CausalSelfAttention, rms_norm, rotary_tables


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, kv_cache: StaticKVCache | None = None
    ) -> Tensor:
        x = x + self.attn(rms_norm(x), cos, sin, positions, kv_cache)
        return x + self.mlp(rms_norm(x))


class DecoderLM(nn.Module):
    """Embedding, block loop with optional x0 mixing, final norm, untied head, optional softcap.

    Subclasses choose the block type and how the hidden state is split into (``expand``) and
    merged from (``collapse``) residual streams; plain GPT uses a single stream [B, T, d].
    """

    block_cls: type[nn.Module] = Block

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([self.block_cls(config, layer_idx=i) for i in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.x0_mixing:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        cos, sin = rotary_tables(config.sequence_len, config.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Linears ~ N(0, 1/fan_in), output projections x 1/sqrt(2 n_layer); embedding ~ N(0, 1)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features**-0.5)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=1.0)
        for block in self.blocks:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.mul_(1.0 / math.sqrt(2 * self.config.n_layer))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_seq_len(self) -> int:
        """The longest sequence the model takes, KV cache included."""
        return self.config.sequence_len

    @property
    def kv_cache_geometry(self) -> dict[str, int]:
        """The `geometry` of the caches `make_kv_cache` builds."""
        return StaticKVCache.geometry_of(self.config)

    def make_kv_cache(
        self, batch_size: int, max_seq_len: int, device: torch.device | str | None, dtype: torch.dtype
    ) -> StaticKVCache:
        """An empty StaticKVCache for this model (what `snlp_compile.decoding` allocates)."""
        return StaticKVCache(self.config, batch_size, max_seq_len, dtype=dtype, device=device)

    def expand(self, x: Tensor) -> Tensor:
        """Embedding [B, T, d] -> hidden state."""
        return x

    def collapse(self, x: Tensor) -> Tensor:
        """Hidden state -> [B, T, d]."""
        return x

    def forward(self, idx: Tensor, kv_cache: StaticKVCache | None = None) -> Tensor:
        """Token ids [B, T] -> float logits [B, T, vocab_size]; advances ``kv_cache.pos`` by T.

        The checks raise here and the layers run in `_forward`: a raise while dynamo traces a frame
        makes it skip that code object for the rest of the process, so after a rejected call a
        compiled model runs this frame eagerly and still compiles `_forward` whole."""
        if idx.dim() != 2 or idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise ValueError(f"idx must be a 2-D integer tensor [B, T], got {idx.dim()}-D {idx.dtype}")
        if not 1 <= idx.shape[1] <= self.config.sequence_len:
            raise ValueError(f"sequence length T must be in [1, {self.config.sequence_len}], got {idx.shape[1]}")
        return self._forward(idx, kv_cache)

    def _forward(self, idx: Tensor, kv_cache: StaticKVCache | None) -> Tensor:
        """`forward` on checked token ids."""
        B, T = idx.shape
        positions = torch.arange(T, device=idx.device)
        if kv_cache is not None:
            kv_cache.check(B, T)
            positions = positions + kv_cache.pos
        cos, sin = self.cos[positions], self.sin[positions]

        x = self.expand(rms_norm(self.wte(idx)))
        x0 = x
        for i, block in enumerate(self.blocks):
            if self.config.x0_mixing:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            x = block(x, cos, sin, positions, kv_cache)
        logits = self.lm_head(rms_norm(self.collapse(x))).float()
        if self.config.softcap is not None:
            cap = self.config.softcap
            logits = cap * torch.tanh(logits / cap)
        if kv_cache is not None:
            kv_cache.pos.add_(T)
        return logits


class GPT(DecoderLM):
    """nanochat-style GPT: rotary, QK-norm, relu^2 MLP, no biases, untied head."""

    block_cls = Block
