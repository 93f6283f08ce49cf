"""The ways of running a model that the benchmarks compare, how each is compiled, and how its output is
checked against the eager model.

Invariants:
- Every variant is compiled from the same model (one set of weights per preset): `build_model` stacks the
  layers' weights in place, values unchanged, so eager and compiled variants read the same weights.
- SNLP variants always run with fallback="error": a silent fallback can never yield an SNLP number.
- A sequential-equivalent variant (`exact`) must match eager within TOLERANCE[dtype].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from snlp_compile import prepare, snlp_backend
from snlp_compile.models import GPT, GPTConfig
from snlp_compile.solver import split_even

# Largest relative logit error against eager that a sequential-equivalent variant may show.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Variant:
    """One way of running the model. backend None = eager; options are SNLP options."""

    name: str
    backend: str | None = None
    mode: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    exact: bool = True  # sequential-equivalent: must match eager within TOLERANCE
    timed: bool = True

    @property
    def kind(self) -> str:
        return "snlp" if self.backend == "snlp" else "baseline"

    @property
    def cudagraphs(self) -> bool:
        return self.mode in ("reduce-overhead", "max-autotune") or bool(self.options.get("cudagraphs"))


def baseline_variants(device: torch.device) -> list[Variant]:
    """In priority order: eager, inductor with CUDA graphs, inductor on GPU; on CPU (smoke runs) eager and
    dynamo with the eager backend, which exercise the harness without inductor's compile time."""
    if device.type == "cuda":
        return [
            Variant("eager"),
            Variant("inductor+cg", "inductor", "reduce-overhead"),
            Variant("inductor", "inductor"),
        ]
    return [Variant("eager"), Variant("dynamo-eager", "eager")]


def snlp_variant(n_layer: int, spec: dict[str, Any], cudagraphs: bool, inner: str, timed: bool = True) -> Variant:
    """An SNLP variant from a grid spec {n_par, fuse, iters, blocks, init} (missing keys: defaults)."""
    n_par, fuse, iters = spec["n_par"], spec.get("fuse", 1), spec.get("iters", 1)
    blocks, init = spec.get("blocks", 1), spec.get("init", "h0")
    block = max(split_even(n_par, blocks)) if 1 <= blocks <= n_par else n_par
    exact = fuse == 1 and iters >= block - (init == "batch_fwd")
    options = dict(n_seq=n_layer - n_par, fuse=fuse, blocks=blocks, iters=iters, init=init, inner=inner)
    name = f"snlp p{n_par} F{fuse} K{iters}" + (f" B{blocks}" if blocks > 1 else "")
    name += " bf" if init == "batch_fwd" else ""
    name += " +cg" if cudagraphs else ""
    name += " check" if not timed else ""
    return Variant(
        name, "snlp", options={**options, "fallback": "error", "cudagraphs": cudagraphs}, exact=exact, timed=timed
    )


def with_option(variant: Variant, option: str, suffix: str) -> Variant:
    """The SNLP variant with one more boolean SNLP option on, its name suffixed."""
    return dataclasses.replace(variant, name=f"{variant.name} {suffix}", options={**variant.options, option: True})


def grid_variants(
    n_layer: int, grid: Sequence[dict[str, Any]], cudagraphs: str, inner: str, on_gpu: bool, default_cg: bool
) -> list[list[Variant]]:
    """The SNLP variants of each spec of a grid. cudagraphs "default": the first (headline) spec with
    and without CUDA graphs (`default_cg` first), the others with `default_cg`; "both"/"on"/"off" apply
    to every spec. A spec with "check" runs untimed with the eager inner compiler: the exactness check."""
    out = []
    for i, spec in enumerate(grid):
        if spec.get("check"):
            out.append([snlp_variant(n_layer, spec, False, "eager", timed=False)])
            continue
        if not on_gpu or cudagraphs == "off":
            modes = [False]
        elif cudagraphs == "on":
            modes = [True]
        elif cudagraphs == "both" or i == 0:
            modes = [default_cg, not default_cg]
        else:
            modes = [default_cg]
        out.append([snlp_variant(n_layer, spec, cg, inner) for cg in modes])
    return out


def compile_limits() -> AbstractContextManager:
    """Dynamo's recompile limits raised while one variant is compiled, checked and timed (its check and
    timed calls may each compile again); the process-wide defaults are restored on exit."""
    return torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=512)


def compile_variant(model: nn.Module, variant: Variant, skip_module_guards: bool = False) -> Callable:
    """The model itself for eager; else a fresh torch.compile of it with static shapes. skip_module_guards:
    dynamo checks no nn.Module attribute before each call (torch.compiler.skip_guard_on_all_nn_modules_unsafe:
    less host time per call; safe here, where nothing changes the model between calls)."""
    if variant.backend is None:
        return model
    guards = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe} if skip_module_guards else {}
    if variant.backend == "snlp":
        return torch.compile(model, backend=snlp_backend, options={**variant.options, **guards}, dynamic=False)
    if guards:  # torch.compile takes a mode or options, not both: spell the mode as its options
        options = torch._inductor.list_mode_options(variant.mode) if variant.mode else {}
        return torch.compile(model, backend=variant.backend, options={**options, **guards}, dynamic=False)
    return torch.compile(model, backend=variant.backend, mode=variant.mode, dynamic=False)


def build_model(preset: str, device: torch.device, dtype: torch.dtype, seed: int, **overrides: Any) -> GPT:
    """Random-weight GPT of a preset, seeded, in eval mode, with its layers' weights stacked in place
    (`prepare`: values unchanged, so eager and compiled variants all read the same weights)."""
    config = GPTConfig.preset(preset, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPT(config)
    model = model.to(dtype).eval().requires_grad_(False)
    return prepare(model)


@torch.no_grad()
def compare(out: Tensor, ref: Tensor) -> tuple[float, float]:
    """(relative L2 error of the logits, top-1 agreement) of out against ref, both [..., V]."""
    diff = torch.linalg.vector_norm(out.float() - ref.float())
    rel = (diff / torch.linalg.vector_norm(ref.float()).clamp_min(1e-30)).item()
    top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return rel, top1
