"""The one place that chooses a graph's lowering families from the configuration.

Invariant: nothing below the backends reads `inner` or `gemv`; they reach the passes only as the
`LoweringList` chosen here.
"""

from __future__ import annotations

from ..config import SNLPConfig
from ..passes.lowering import BATCHING, DECODE_KERNELS, EAGER_KERNELS, FLOAT32_LOGITS, TWIN_CHAINS, LoweringList


def choose_lowerings(config: SNLPConfig, differentiable: bool) -> LoweringList:
    """The lowering list for a graph compiled under `config`; `differentiable`: gradients may flow
    through it, so only families with an autograd formula run (no decode or eager-path kernels, no
    float32 logits). Twin chains and the eager-path kernels serve graphs run without inductor,
    which fuses those ops by itself."""
    eager = config.inner == "eager"
    families = [
        DECODE_KERNELS if config.gemv and not differentiable else None,
        TWIN_CHAINS if eager else None,
        EAGER_KERNELS if eager and not differentiable else None,
        BATCHING,
        FLOAT32_LOGITS if not differentiable else None,
    ]
    return LoweringList(tuple(f for f in families if f is not None))
