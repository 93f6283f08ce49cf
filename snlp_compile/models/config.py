"""Model configuration shared by GPT and MHCGPT."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for fast CPU tests.
    "tiny": dict(vocab_size=64, n_layer=4, n_embd=32, n_head=4, sequence_len=64),
    # Char-level tinyshakespeare.
    "char": dict(vocab_size=128, n_layer=8, n_embd=384, n_head=6, sequence_len=256),
    # nanochat d20.
    "d20": dict(vocab_size=65536, n_layer=20, n_embd=1280, n_head=10, sequence_len=2048),
    "paper-0.5b": dict(vocab_size=65536, n_layer=32, n_embd=640, n_head=5, sequence_len=2048),
}


@dataclass
class GPTConfig:
    """Hyper-parameters of a decoder-only Transformer.

    Invariants (checked in ``__post_init__``): all sizes positive, ``n_embd % n_head == 0``,
    ``n_head % n_kv_head == 0``, ``head_dim`` even (rotary), windows positive.
    """

    vocab_size: int = 256
    n_layer: int = 4
    n_embd: int = 64
    n_head: int = 4
    n_kv_head: int | None = None  # None = n_head; fewer = grouped-query attention
    sequence_len: int = 256  # max context: rotary table size and default KV-cache length
    window_pattern: tuple[int | None, ...] | None = None  # per-layer windows, cycled; None = full causal
    x0_mixing: bool = False
    softcap: float | None = None
    n_streams: int = 4  # MHCGPT only
    sinkhorn_iters: int = 20  # MHCGPT only

    def __post_init__(self) -> None:
        sizes = ("vocab_size", "n_layer", "n_embd", "n_head", "sequence_len", "n_streams", "sinkhorn_iters")
        for name in sizes:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int (>= 1), got {value!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if not isinstance(self.n_kv_head, int) or not 1 <= self.n_kv_head <= self.n_head:
            raise ValueError(f"GPTConfig.n_kv_head must be in [1, n_head={self.n_head}], got {self.n_kv_head!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig.n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"GPTConfig head_dim = n_embd / n_head = {self.head_dim} must be even (rotary embeddings)")
        if self.window_pattern is not None:
            self.window_pattern = tuple(self.window_pattern)
            if not self.window_pattern:
                raise ValueError("GPTConfig.window_pattern must be None or a non-empty tuple of windows")
            for w in self.window_pattern:
                if w is not None and (not isinstance(w, int) or w < 1):
                    raise ValueError(
                        f"GPTConfig.window_pattern entries must be None or positive ints (>= 1), got {w!r}"
                    )
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"GPTConfig.softcap must be None or > 0, got {self.softcap!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def window_for_layer(self, i: int) -> int | None:
        """Sliding-window size of layer ``i`` (None = full causal attention)."""
        if not 0 <= i < self.n_layer:
            raise ValueError(f"layer index must be in [0, {self.n_layer}), got {i}")
        if self.window_pattern is None:
            return None
        return self.window_pattern[i % len(self.window_pattern)]

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """Named configuration (``tiny``, ``char``, ``d20``, ``paper-0.5b``) with optional overrides."""
        if name not in _PRESETS:
            raise ValueError(f"unknown GPTConfig preset {name!r}; valid names: {', '.join(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})
