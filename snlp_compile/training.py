"""SNLP-aware regularisation: train a model so that few Newton iterations suffice at inference.

`SNLPRegularizer` watches the layer stack of an eager model with forward hooks and, after each
normal forward, scores how far a K-iteration SNLP solve of the last n_par layers lands from the
sequential trace that forward just computed:

    R = mean_j mean_tokens ||h~_j,t - h_j,t|| / ||h_j,t||,    loss = weight * warmup(step) * mean R

The norms are per token (the state's axes after batch and position, [B, T, ...]), so every
position counts equally: a norm over whole sequences is dominated by the few positions with
massive activations and lets a model score a small R while most tokens are far off.

Invariants:

- The SNLP trace h~ is `solver.solve_traces` on the hooked blocks themselves (closures over the
  captured side inputs), started from the state before the first parallel layer, one solve per
  n_par whose iteration counts share their iterations; h is the captured sequential trace; the
  loss averages R over every (n_par, iters) pair. A term with iters >= n_par is exactly zero (the
  solver's exactness invariant) and is not computed.
- The surrogate matches what the snlp backend reads off the graph: IDN, a scaled identity
  (`resid_lambdas`, x0 mixing) or HCN (the blocks' HyperConnection H_res matrices composed in
  registration order, which is their execution order in MHCBlock).
- With weight 0 no hook is registered and `loss()` is a constant zero.
- The model is never modified beyond the hooks (`remove()` takes them off); its weights are
  only read.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from .config import SNLPConfig, check_int, int_range, is_int_in
from .models.gpt import DecoderLM
from .models.mhc import HyperConnection, sinkhorn
from .runtime.prepare import layer_signature
from .solver import IDENTITY, CallableStack, Surrogate, solve_traces

logger = logging.getLogger("snlp_compile")


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, container) of the nn.ModuleList with the most structurally identical children.

    This is the module-tree counterpart of passes/detect.py's layer stack (which finds the same
    container through the `nn_module_stack` paths of a traced graph); children are compared by
    type and parameter signature, as `snlp_compile.prepare` groups layers for stacking.
    """
    best: tuple[str, nn.ModuleList] | None = None
    best_count = 1
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        count = max(Counter((type(c), layer_signature(c)) for c in module).values())
        if count > best_count:
            best, best_count = (name, module), count
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList with two or more structurally identical children "
            "(a layer stack) for the SNLP regulariser to watch"
        )
    return best


@dataclass
class _Call:
    """One block call seen by the hook: block(state, *args, **kwargs) -> output."""

    state: Tensor
    args: tuple
    kwargs: dict
    output: Tensor


def _relative_error(approx: Tensor, target: Tensor) -> Tensor:
    """Mean over tokens of ||approx_t - target_t|| / ||target_t||, in float32; a token is one index of
    the two leading (batch, position) axes, its vector the rest (the last axis for a 2-D state)."""
    start = min(2, target.dim() - 1)
    diff = (approx - target).float().flatten(start)
    norm = torch.linalg.vector_norm(target.float().flatten(start), dim=-1).clamp_min(1e-12)
    return (torch.linalg.vector_norm(diff, dim=-1) / norm).mean()


def _h_res(connections: list[HyperConnection]) -> dict[int, Tensor]:
    """{id(hc): its Sinkhorn H_res in float32}, one batched Sinkhorn per iteration count (not one
    small-kernel loop per connection: the regulariser runs this every step)."""
    out: dict[int, Tensor] = {}
    for iters in {hc.sinkhorn_iters for hc in connections}:
        group = [hc for hc in connections if hc.sinkhorn_iters == iters]
        stacked = sinkhorn(torch.stack([hc.res_logits.float() for hc in group]), iters)
        out.update(zip(map(id, group), stacked, strict=True))
    return out


def _counts(name: str, value: Any, low: int, high: int | None = None, unit: str = "") -> tuple[int, ...]:
    """One count or a tuple / list of them as a tuple, each an integer in [low, high] (`is_int_in`);
    ValueError naming SNLPRegularizer.<name>, the valid range and `unit` otherwise."""
    counts = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not counts or not all(is_int_in(k, low, high) for k in counts):
        raise ValueError(
            f"SNLPRegularizer.{name} must be one or more integers {int_range(low, high)}{unit}, got {value!r}"
        )
    return counts


def _rng_states(device: torch.device) -> list[Tensor]:
    """The states of the default generators random ops on `device` draw from (the CPU one always)."""
    states = [torch.random.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


@contextlib.contextmanager
def _drawing_nothing(device: torch.device, blocks: str) -> Iterator[None]:
    """Raise ValueError when the code inside (the SNLP solves of `blocks`) draws random numbers."""
    before = _rng_states(device)
    yield
    if not all(map(torch.equal, before, _rng_states(device))):
        raise ValueError(
            f"SNLPRegularizer: the blocks of {blocks} draw random numbers (dropout in training mode?): every Newton "
            "iteration of the SNLP solve would draw new ones, so its trace cannot be compared with the forward's; "
            "train with dropout 0 to regularise"
        )


def _check_side_input(value: Any, where: str) -> None:
    if isinstance(value, (Tensor, int, float, bool, str, type(None))):
        return
    if isinstance(value, (tuple, list)):
        for item in value:
            _check_side_input(item, where)
        return
    raise ValueError(
        f"SNLPRegularizer: {where} receives a {type(value).__name__}; side inputs must be tensors or constants, "
        "since the regulariser calls each block again (a KV cache would be written twice: regularise "
        "training forwards without one)"
    )


class SNLPRegularizer:
    """The SNLP-aware regularisation loss of an eager model (the paper's lambda * mean_j rel. error).

    Usage, after each normal training forward (eager, bf16 autocast and gradient accumulation:
    one forward, one `loss()`; the loss is computed under the autocast state of the forward):

        reg = SNLPRegularizer(model, weight=0.5, warmup_steps=100)
        logits = model(x)                  # or: with reg: logits = model(x)
        loss = ce(logits, y) + reg.loss()
        loss.backward(); opt.step(); reg.step()

    `with reg:` drops captures of earlier forwards, so the loss refers to the forward inside it.

    Arguments: weight, finite and >= 0 (lambda); n_par: the number(s) of last layers solved in parallel, each
    in [1, L] (the loss averages over them; default L // 2); stride: 0 scores the last layer only,
    s >= 1 every s-th layer of the parallel part (s <= min(n_par)); iters: the iteration count(s)
    K >= 1 of the solve (the loss averages over them too, e.g. (1, 2) to train for K = 1 and 2);
    init ("h0" | "batch_fwd") of the solve; detach_target: no gradient through the sequential trace;
    warmup_steps >= 0: the weight ramps linearly from 0 at step 0 to full at warmup_steps;
    surrogate: "auto" (HCN for blocks with HyperConnections, else read off the glue), "identity"
    (IDN) or "hc" (HCN; an error without HyperConnections); checkpoint: keep no activations of the
    SNLP solves for backward but recompute each in turn (`torch.utils.checkpoint`): the memory of
    one solve instead of all of them, for one more forward of the solves.

    The stack is found by `find_block_list`. Glue the parent loop applies between blocks is
    invisible to hooks; it is detected (the input of block l+1 is not the output of block l) and
    modelled for the reference models' x0 mixing (x_l = resid_lambdas[l] * h + x0_lambdas[l] *
    x0, the x0 term read off the captured tensors), which, as in the snlp backend, belongs to the
    layer after it; any other glue raises ValueError.

    With n_par = L and x0 mixing, the solve starts from block 0's input (after its mixing) where
    the backend starts from x0: the two differ only in the initial guess.

    Compiled models: hooks registered on the blocks fire inside `torch.compile(model)` too, since
    dynamo traces them (checked on CPU with the eager, aot_eager and inductor backends: the same
    loss and gradients as eager); `loss()` itself runs eagerly. Give the regulariser the module,
    not the compiled wrapper. Blocks must be deterministic, since the SNLP trace calls them again:
    `loss()` raises ValueError when they draw random numbers (dropout in training mode).
    DistributedDataParallel: give the regulariser the wrapped module and add its
    loss before backward; its gradients are all-reduced with the task loss's (tested with two CPU
    ranks over gloo).
    """

    _solving = False  # set while any regulariser re-runs blocks: their calls are not a forward to capture

    @staticmethod
    @contextlib.contextmanager
    def _re_running_blocks() -> Iterator[None]:
        """Hooks ignore block calls inside (the solves, and their recomputation in backward)."""
        previous, SNLPRegularizer._solving = SNLPRegularizer._solving, True
        try:
            yield
        finally:
            SNLPRegularizer._solving = previous

    def __init__(
        self,
        model: nn.Module,
        weight: float = 0.5,
        n_par: int | Sequence[int] | None = None,
        stride: int = 0,
        iters: int | Sequence[int] = 1,
        init: str = "h0",
        detach_target: bool = False,
        warmup_steps: int = 0,
        surrogate: str = "auto",
        checkpoint: bool = False,
    ) -> None:
        self.name, self.blocks = find_block_list(model)
        depth = len(self.blocks)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
            raise ValueError(f"SNLPRegularizer.weight must be a finite number >= 0, got {weight!r}")
        n_par = _counts("n_par", depth // 2 if n_par is None else n_par, 1, depth, f" (layers of {self.name})")
        check_int("SNLPRegularizer.stride", stride, 0, min(n_par))
        check_int("SNLPRegularizer.warmup_steps", warmup_steps, 0)
        for name, flag in (("detach_target", detach_target), ("checkpoint", checkpoint)):
            if not isinstance(flag, bool):
                raise ValueError(f"SNLPRegularizer.{name} must be True or False, got {flag!r}")
        self.iters = tuple(sorted(set(_counts("iters", iters, 1))))
        self.config = SNLPConfig(init=init, surrogate=surrogate)
        self.hyper_connections = [[m for m in b.modules() if isinstance(m, HyperConnection)] for b in self.blocks]
        has_hc = all(self.hyper_connections)
        if surrogate == "hc" and not has_hc:
            raise ValueError(
                f"SNLPRegularizer.surrogate='hc' needs HyperConnection modules in every block of {self.name}; "
                "use 'auto' or 'identity'"
            )
        self.use_hc = has_hc and surrogate in ("auto", "hc")
        self.model, self.weight, self.n_par, self.stride = model, float(weight), n_par, stride
        self.detach_target, self.warmup_steps, self.step_count = detach_target, warmup_steps, 0
        self.checkpoint = checkpoint
        self._device = next(model.parameters()).device
        self._calls: list[_Call | None] | None = None
        self._autocast: tuple[str, bool, torch.dtype] | None = None
        self._handles = []
        if self.weight > 0:
            self._handles = [
                block.register_forward_hook(self._hook(i), with_kwargs=True) for i, block in enumerate(self.blocks)
            ]

    def _hook(self, index: int) -> Callable:
        def capture(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if SNLPRegularizer._solving:
                return
            if index == 0:
                self._calls = [None] * len(self.blocks)
                device = args[0].device.type if args and isinstance(args[0], Tensor) else self._device.type
                self._autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
            if self._calls is not None:
                state = args[0] if args else None
                self._calls[index] = _Call(state, tuple(args[1:]), dict(kwargs), output)

        return capture

    @property
    def current_weight(self) -> float:
        """weight * warmup(step): ramps linearly from 0 at step 0 to weight at warmup_steps."""
        if self.warmup_steps == 0:
            return self.weight
        return self.weight * min(1.0, self.step_count / self.warmup_steps)

    def step(self) -> None:
        """Advance the warm-up schedule by one optimizer step."""
        self.step_count += 1

    def remove(self) -> None:
        """Take the hooks off the model and drop captured tensors."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._calls = [], None

    def __enter__(self) -> SNLPRegularizer:
        self._calls = None
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def loss(self) -> Tensor:
        """weight * warmup(step) * R for the latest captured forward (a scalar; zero when the
        current weight is 0). Consumes the captures: one forward, one loss."""
        scale = self.current_weight
        calls, self._calls = self._calls, None
        if scale == 0:
            return torch.zeros((), device=self._device)
        calls = self._checked(calls)
        device_type, enabled, dtype = self._autocast
        autocast = torch.autocast(device_type, dtype=dtype, enabled=enabled)
        with self._re_running_blocks(), autocast, _drawing_nothing(self._device, self.name):
            mixes = self._block_mixes() if self.use_hc else None  # once per loss, shared by every n_par
            terms = [term for n in self.n_par for term in self._gaps(calls, n, mixes)]
        if not terms:
            return torch.zeros((), device=self._device)
        return scale * torch.stack(terms).sum() / (len(self.n_par) * len(self.iters))

    def _checked(self, calls: list[_Call | None] | None) -> list[_Call]:
        if calls is None or any(c is None for c in calls):
            raise RuntimeError(
                f"SNLPRegularizer.loss(): no complete forward of {self.name} was captured since the last loss() "
                "(run the model forward first, inside `with reg:` when using the context form)"
            )
        for i, call in enumerate(calls):
            where = f"{self.name}.{i}"
            if not isinstance(call.state, Tensor) or not isinstance(call.output, Tensor):
                raise ValueError(
                    f"SNLPRegularizer: {where} must be called as block(state, ...) with the state tensor as its first "
                    "positional argument and return the new state tensor"
                )
            _check_side_input((call.args, tuple(call.kwargs.values())), where)
        return calls

    def _glue(self, calls: list[_Call], index: int) -> tuple[Tensor, Tensor] | None:
        """(r, c) with x_index = r * output_{index-1} + c, or None when the blocks chain directly."""
        if index == 0 or calls[index].state is calls[index - 1].output:
            return None
        model = self.model
        if not (isinstance(model, DecoderLM) and model.config.x0_mixing):
            raise ValueError(
                f"SNLPRegularizer: the input of {self.name}.{index} is not the output of {self.name}.{index - 1}: "
                f"the parent {type(model).__name__} transforms the state between blocks, which hooks cannot see; "
                "only the x0 mixing of snlp_compile.models is modelled"
            )
        r = model.resid_lambdas[index]
        return r, calls[index].state - r * calls[index - 1].output

    def _block_mixes(self) -> list[Tensor]:
        """Per block, the product of its HyperConnections' H_res in execution order (float32)."""
        h_res = _h_res([hc for hcs in self.hyper_connections for hc in hcs])
        mixes = []
        for hcs in self.hyper_connections:
            mix = torch.eye(hcs[0].res_logits.shape[-1], device=self._device)
            for hc in hcs:
                mix = h_res[id(hc)] @ mix
            mixes.append(mix)
        return mixes

    def _surrogate(self, glue: list[tuple[Tensor, Tensor] | None], first: int, mixes: list[Tensor] | None) -> Surrogate:
        """J of the parallel layers from `first` on: HCN mixing (`mixes`, from `_block_mixes`; None
        without HyperConnections) and/or the glue's resid_lambdas scale."""
        scales = [None if g is None else g[0] for g in glue]
        if self.use_hc:
            values = [mix if r is None else r * mix for mix, r in zip(mixes[first:], scales, strict=True)]
            return Surrogate("mix", torch.stack(values))
        if self.config.surrogate == "auto" and any(r is not None for r in scales):
            one = torch.ones((), device=self._device)
            return Surrogate("scale", torch.stack([one if r is None else r.float() for r in scales]))
        return IDENTITY

    def _gaps(self, calls: list[_Call], n_par: int, mixes: list[Tensor] | None) -> list[Tensor]:
        """R for the last n_par layers, one per iteration count K < n_par (K >= n_par is exact: zero):
        the mean over the scored layers of the per-token relative error."""
        counts = [k for k in self.iters if k < n_par]
        if not counts:
            return []
        first = len(calls) - n_par
        glue = [self._glue(calls, i) for i in range(first, len(calls))]

        def layer(i: int) -> Callable[[Tensor], Tensor]:
            call, block, g = calls[first + i], self.blocks[first + i], glue[i]
            if g is None:
                return lambda h: block(h, *call.args, **call.kwargs)
            return lambda h: block(g[0] * h + g[1], *call.args, **call.kwargs)

        stack = CallableStack([layer(i) for i in range(n_par)], self._surrogate(glue, first, mixes))
        h0 = calls[first - 1].output if first > 0 else calls[0].state
        scored = [n_par - 1] if self.stride == 0 else list(range(self.stride - 1, n_par, self.stride))
        targets = [calls[first + j].output for j in scored]
        if self.detach_target:
            targets = [t.detach() for t in targets]

        def solve(h0: Tensor) -> dict[int, dict[int, Tensor]]:  # the counts share iterations
            with self._re_running_blocks():
                return solve_traces(stack, h0, self.config, counts)

        recompute = torch.utils.checkpoint.checkpoint
        traces = recompute(solve, h0, use_reentrant=False) if self.checkpoint else solve(h0)
        gaps = []
        for iters in counts:
            trace = traces[iters]
            errors = [_relative_error(trace[j], target) for j, target in zip(scored, targets, strict=True)]
            gaps.append(torch.stack(errors).mean())
        return gaps
