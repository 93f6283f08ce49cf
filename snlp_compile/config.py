"""SNLPConfig: every option of the solver and the compiler, validated in one place.

Invariant: a constructed SNLPConfig is valid on its own; `check_depth(L)` adds the checks that
need the number of layers of the stack it is applied to. Every error is a ValueError that names
the field and its valid range.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

_CHOICES: dict[str, tuple[str, ...]] = {
    "init": ("h0", "batch_fwd"),
    "surrogate": ("auto", "identity", "hc"),
    "inner": ("inductor", "eager"),
    "fallback": ("warn", "error"),
    "prefill": ("snlp", "sequential"),
}


def int_range(low: int, high: int | None = None) -> str:
    """How an error message names the integers in [low, high] (no upper bound when high is None)."""
    return f">= {low}" if high is None else f"in [{low}, {high}]"


def is_int_in(value: object, low: int, high: int | None = None) -> bool:
    """value is an int in [low, high] (no upper bound when high is None); a bool is not a count."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value and (high is None or value <= high)


def check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """Raise ValueError naming `name` and the valid range unless `is_int_in(value, low, high)`."""
    if not is_int_in(value, low, high):
        raise ValueError(f"{name} must be an integer {int_range(low, high)}, got {value!r}")


@dataclass(frozen=True)
class SNLPConfig:
    """Options of a structured-Newton solve (paper notation in brackets).

    n_seq:      leading layers run sequentially [L - n_par], >= 0.
    fuse:       consecutive layers merged into one super-layer [F M], >= 1; exact only for 1.
    blocks:     consecutive Newton blocks the parallel layers are split into, >= 1.
    iters:      Newton iterations per block [K], >= 1; iters >= block size is exact, and a solve
                runs no more iterations than that (more would change nothing: `solver.useful_iters`).
    init:       "h0" (every input = block input) or "batch_fwd" (one batched evaluation).
    damping:    the correction is scaled by (1 - damping), 0 <= damping < 1.
    surrogate:  "auto" (read off the graph), "identity" (IDN) or "hc" (HCN, stream mixing).
    inner:      compiler the rewritten graph goes to: "inductor" or "eager".
    fallback:   on an unsafe graph, "warn" (run it unmodified, log why) or "error" (raise).
    cudagraphs: let inductor wrap the rewritten graph in CUDA graphs (GPU only).
    max_autotune: let inductor autotune its GEMMs and kernel configs (max_autotune and
                coordinate_descent_tuning, as its max-autotune modes; slower compile).
    gemv:       inference decode kernels (CUDA, <= 16 tokens per layer; else bmm / F.linear /
                SDPA): bias-free linears through `snlp::linear`'s Triton GEMV (the parallel
                layers' as one stacked call, sibling linears of one input such as q, k, v in one
                launch, the sequential layers' and the LM head one by one), and one-layer decode
                attention through `snlp::decode_attention`'s split-KV kernels. Pays only with
                CUDA graphs (the backend warns otherwise).
    prefill:    how decode-capable graphs handle a multi-token prompt: "snlp" or "sequential".
    """

    n_seq: int = 0
    fuse: int = 1
    blocks: int = 1
    iters: int = 1
    init: str = "h0"
    damping: float = 0.0
    surrogate: str = "auto"
    inner: str = "inductor"
    fallback: str = "warn"
    cudagraphs: bool = False
    max_autotune: bool = False
    gemv: bool = False
    prefill: str = "snlp"

    def __post_init__(self) -> None:
        for name, low in (("n_seq", 0), ("fuse", 1), ("blocks", 1), ("iters", 1)):
            check_int(f"SNLPConfig.{name}", getattr(self, name), low)
        if (
            isinstance(self.damping, bool)
            or not isinstance(self.damping, (int, float))
            or not (0.0 <= self.damping < 1.0)
        ):
            raise ValueError(f"SNLPConfig.damping must be a number in [0, 1), got {self.damping!r}")
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"SNLPConfig.{name} must be one of {choices}, got {value!r}")
        for name in ("cudagraphs", "max_autotune", "gemv"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SNLPConfig.{name} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | SNLPConfig | None) -> SNLPConfig:
        """Build from a torch.compile `options` dict; unknown keys are an error."""
        if options is None:
            return cls()
        if isinstance(options, SNLPConfig):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"SNLP options must be a dict or SNLPConfig, got {type(options).__name__}")
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ValueError(f"unknown SNLP option(s) {unknown}; valid options are {sorted(valid)}")
        return cls(**dict(options))

    def replace(self, **changes: Any) -> SNLPConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def check_depth(self, num_layers: int) -> None:
        """Checks that need the depth L of the stack this config is applied to."""
        if self.n_seq >= num_layers:
            raise ValueError(f"SNLPConfig.n_seq must be < the number of layers ({num_layers}), got {self.n_seq}")
        n_par = num_layers - self.n_seq
        for name in ("blocks", "fuse"):
            if getattr(self, name) > n_par:
                raise ValueError(
                    f"SNLPConfig.{name} must be <= the number of parallel layers ({n_par}), got {getattr(self, name)}"
                )
