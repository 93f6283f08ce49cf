"""Lowering: pass families that choose the kernels of a rewritten graph, run from one list (`rewrite.lowering_list`).

The families, in the order a `LoweringList` takes them (earlier ones take precedence on a node):
decode kernels, twin chains, eager-path kernels, batching, float32 logits. The backend chooses
which of them run (`backends.lowerings.choose_lowerings`); nothing below it reads the options.
"""

from ..rewrite.lowering_list import Lowering, LoweringList, Where
from .batching import BATCHING
from .decode_kernels import DECODE_KERNELS
from .eager_kernels import EAGER_KERNELS
from .float32_logits import FLOAT32_LOGITS
from .twin_chains import TWIN_CHAINS

__all__ = [
    "BATCHING",
    "DECODE_KERNELS",
    "EAGER_KERNELS",
    "FLOAT32_LOGITS",
    "TWIN_CHAINS",
    "Lowering",
    "LoweringList",
    "Where",
]
