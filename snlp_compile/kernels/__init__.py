"""Custom ops and GPU kernels of the rewrite."""

from collections.abc import Callable

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)  # the 16-bit floating dtypes the GPU kernels serve


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (n >= 1): a block size that covers n elements (as
    `triton.next_power_of_2`, for tile rules that run without Triton)."""
    return 1 << (n - 1).bit_length()


_EAGER_OPS = torch.library.Library("snlp", "FRAGMENT")  # kept alive: the registrations last as long as it


def eager_op(schema: str, kernel: Callable, fake: Callable, vmap: Callable) -> torch._ops.OpOverload:
    """`snlp::<schema>` for graphs that run eagerly: the dispatcher calls `kernel` directly on every
    device (no `torch.library.custom_op` wrapper, which costs several times the host time of the
    call: RESULTS.md), `fake` gives its output's metadata and `vmap` its batching rule. Inference
    only: no autograd formula."""
    name = schema.split("(", 1)[0]
    _EAGER_OPS.define(schema)
    _EAGER_OPS.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"snlp::{name}", fake, lib=_EAGER_OPS)
    torch.library.register_vmap(f"snlp::{name}", vmap, lib=_EAGER_OPS)
    return getattr(torch.ops.snlp, name).default
