"""SNLP-aware regularisation: train a model so that few Newton iterations suffice at inference.

`SNLPRegularizer` watches a model's forwards and, after each, scores how far a K-iteration SNLP
solve of the last n_par layers lands from the sequential trace that forward computed:

    R = mean_j mean_tokens ||h~_j,t - h_j,t|| / ||h_j,t||,    loss = weight * warmup(step) * mean R

The norms are per token (the state's axes after batch and position, [B, T, ...]), so every
position counts equally: a norm over whole sequences is dominated by the few positions with
massive activations and lets a model score a small R while most tokens are far off.

Invariants:

- The stack, its layers (glue such as x0 mixing included, as the layer after it) and its surrogate
  (IDN, a scaled identity, HCN stream mixing) are what the compiler's own analysis finds in the
  model's dynamo graph (`traced_stack`), traced once per input structure: any model the backend
  rewrites can be regularised, and the surrogate is the one inference will use.
- The SNLP trace h~ is `solver.solve_traces` on those layer functions, started from the state
  before the first parallel layer, one solve per n_par whose iteration counts share their
  iterations; h is the forward's own sequential trace (captured by forward hooks on the layers'
  modules; recomputed from the layer functions for a forward no hook saw, such as the first); the
  loss averages R over every (n_par, iters) pair (iters: those of that n_par, when given per n_par).
  A term with iters >= n_par is exactly zero (the solver's exactness invariant) and is not computed.
- With weight 0 no hook is registered and `loss()` is a constant zero.
- The model is never modified beyond the hooks (`remove()` takes them off); its weights are only read.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ..config import SNLPConfig, check_int, int_range, is_int_in
from ..solver import IDENTITY, CallableStack, solve_traces
from .traced_stack import TracedStack, trace_stack


def relative_error(approx: Tensor, target: Tensor, last_axis: bool = False) -> Tensor:
    """Mean over tokens of ||approx_t - target_t|| / ||target_t||, in float32; a token is one index of
    the two leading (batch, position) axes, its vector the rest (the last axis for a 2-D state).
    `last_axis`: the paper's form instead, a vector per index of every axis but the last, with the
    norm clamped at 1e-6."""
    start = target.dim() - 1 if last_axis else min(2, target.dim() - 1)
    diff = (approx - target).float().flatten(start)
    norm = torch.linalg.vector_norm(target.float().flatten(start), dim=-1).clamp_min(1e-6 if last_axis else 1e-12)
    return (torch.linalg.vector_norm(diff, dim=-1) / norm).mean()


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
def _drawing_nothing(device: torch.device) -> Iterator[None]:
    """Raise ValueError when the code inside (the stack's side inputs and SNLP solves) draws random numbers."""
    before = _rng_states(device)
    yield
    if not all(map(torch.equal, before, _rng_states(device))):
        raise ValueError(
            "SNLPRegularizer: recomputing the stack's side inputs or its layers draws random numbers (dropout in "
            "training mode?): every Newton iteration would draw new ones, so its trace cannot be compared with the "
            "forward's; train with dropout 0 to regularise"
        )


def _structure(args: tuple, kwargs: dict, training: bool) -> tuple:
    """What a traced stack depends on: the tensors' shapes, dtypes and devices, the other values, the mode."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    described = tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, Tensor) else repr(x) for x in leaves)
    return described, str(spec), training


def _state(output: Any) -> Tensor | None:
    """The state a layer module returns: its output, or the first tensor of a returned tuple."""
    return next((x for x in pytree.tree_leaves(output) if isinstance(x, Tensor)), None)


class SNLPRegularizer:
    """The SNLP-aware regularisation loss of a model (the paper's lambda * mean_j rel. error).

    Usage, after each normal training forward (eager or torch.compile'd, bf16 autocast and gradient
    accumulation: one forward, one `loss()`; the loss is computed under the autocast state of the
    forward):

        reg = SNLPRegularizer(model, weight=0.5, warmup_steps=100)
        logits = model(x)                  # or: with reg: logits = model(x)
        loss = ce(logits, y) + reg.loss()
        loss.backward(); opt.step(); reg.step()

    `with reg:` drops the capture of earlier forwards, so the loss refers to the forward inside it.

    Arguments: weight, finite and >= 0 (lambda); n_par: the number(s) of last layers solved in
    parallel, each in [1, L] (L: the layers of the stack the compiler finds; the loss averages over
    them; default L // 2); stride: 0 scores the last layer only, s >= 1 every s-th layer of the
    parallel part (s <= min(n_par)); iters: the iteration count(s) K >= 1 of the solve (the loss
    averages over them too, e.g. (1, 2) to train for K = 1 and 2), or a mapping from each n_par to its
    own count(s), e.g. {24: 1, 32: 2} to train n_par 24 at K = 1 and n_par 32 at K = 2 only (its
    keys are then the n_par values); init ("h0" | "batch_fwd") of the
    solve; detach_target: no gradient through the sequential trace; warmup_steps >= 0: the weight
    ramps linearly from 0 at step 0 to full at warmup_steps; surrogate: "auto" (read off the graph,
    as the compiler does), "identity" (IDN) or "hc" (HCN; an error where the layers have no stream
    mixing); checkpoint: keep no activations of the SNLP solves for backward but recompute each in
    turn (`torch.utils.checkpoint`): the memory of one solve instead of all of them.

    The first `loss()` of each input structure traces the model once with dynamo (one extra forward
    without gradients); n_par and surrogate="hc" are checked against the stack found then. Layers
    must be deterministic, since the SNLP trace calls them again: a layer that draws random numbers
    (dropout in training mode) or writes a KV cache raises ValueError. Give the regulariser the
    module, not a compiled wrapper. DistributedDataParallel: give it the wrapped module and add its
    loss before backward; its gradients are all-reduced with the task loss's.
    """

    _tracing = False  # set while any regulariser traces a model: its hooks' calls are not a forward

    def __init__(
        self,
        model: nn.Module,
        weight: float = 0.5,
        n_par: int | Sequence[int] | None = None,
        stride: int = 0,
        iters: int | Sequence[int] | Mapping[int, int | Sequence[int]] = 1,
        init: str = "h0",
        detach_target: bool = False,
        warmup_steps: int = 0,
        surrogate: str = "auto",
        checkpoint: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"SNLPRegularizer takes an nn.Module, got {type(model).__name__}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
            raise ValueError(f"SNLPRegularizer.weight must be a finite number >= 0, got {weight!r}")
        if isinstance(iters, Mapping):
            keys = _counts("iters' keys (n_par)", list(iters), 1)
            if n_par is not None and set(_counts("n_par", n_par, 1)) != set(keys):
                raise ValueError(f"SNLPRegularizer: iters' keys {sorted(keys)} must be the n_par values, got {n_par!r}")
            n_par = keys
        self.n_par = None if n_par is None else _counts("n_par", n_par, 1)
        check_int("SNLPRegularizer.stride", stride, 0, None if self.n_par is None else min(self.n_par))
        check_int("SNLPRegularizer.warmup_steps", warmup_steps, 0)
        for name, flag in (("detach_target", detach_target), ("checkpoint", checkpoint)):
            if not isinstance(flag, bool):
                raise ValueError(f"SNLPRegularizer.{name} must be True or False, got {flag!r}")
        # the iteration counts of each n_par (None: of the default n_par), sorted and distinct
        per_n_par = iters if isinstance(iters, Mapping) else dict.fromkeys(self.n_par or (None,), iters)
        name = "iters[{}]" if isinstance(iters, Mapping) else "iters"
        self.iters = {n: tuple(sorted(set(_counts(name.format(n), k, 1)))) for n, k in per_n_par.items()}
        self.config = SNLPConfig(init=init, surrogate=surrogate)
        self.model, self.weight, self.stride = model, float(weight), stride
        self.detach_target, self.warmup_steps, self.step_count = detach_target, warmup_steps, 0
        self.checkpoint = checkpoint
        self._device = next(model.parameters()).device
        self._stacks: dict[tuple, TracedStack] = {}
        self._hooked: set[int] = set()  # ids of the layer modules with a capture hook
        self._forward: tuple[tuple, dict, tuple[str, bool, torch.dtype]] | None = None
        self._outputs: dict[int, Tensor] = {}
        self._handles = []
        self._paper_stride: int | None = None  # the paper's form (`paper`) with this stride, else ours
        if self.weight > 0:
            self._handles.append(model.register_forward_pre_hook(self._capture_forward, with_kwargs=True))

    @classmethod
    def paper(
        cls,
        model: nn.Module,
        weight: float,
        n_par: int | Sequence[int],
        stride: int = 0,
        surrogate: str = "auto",
        detach_target: bool = False,
        warmup_steps: int = 0,
    ) -> SNLPRegularizer:
        """The regulariser of the SNLP paper's code, term for term: K = 1 from the block input (init h0);
        J = I for residual models and the H_res product for stream-mixing ones (a lambda-scaled skip path
        counts as I, as the paper's IDN; surrogate="identity" forces I); the loss is weight times the SUM
        over the n_par values and over the scored layers of the per-vector relative error (norm over the
        last axis, clamped at 1e-6). Scored: with stride s > 0 the layers j >= 1 of the parallel part
        with (j + 1) % s == 0, and always the last; with stride 0 the last layer alone, which with J = I
        is the last layer run on the block input (the paper's original form), with mixing the K = 1 solve.

        The default form averages where this sums: `weight=w` here is `weight=w * len(n_par) * scored`
        there (scored: the layers scored per n_par, 1 with stride 0) when each n_par scores as many."""
        reg = cls(
            model,
            weight,
            n_par=n_par,
            stride=0,
            iters=1,
            init="h0",
            detach_target=detach_target,
            warmup_steps=warmup_steps,
            surrogate=surrogate,
        )
        check_int("SNLPRegularizer.paper stride", stride, 0)
        reg._paper_stride = stride
        return reg

    def _capture_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, Tensor)]
        if SNLPRegularizer._tracing or any(isinstance(size, torch.SymInt) for x in tensors for size in x.shape):
            return  # a trace with symbolic shapes (torch.export, dynamic=True) is no forward to regularise
        device = next((x.device.type for x in tensors), None)
        device = device or self._device.type
        autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        self._forward, self._outputs = (tuple(args), dict(kwargs), autocast), {}
        if _structure(args, kwargs, self.model.training) not in self._stacks:  # before the forward: hooks see it
            self._trace(args, kwargs)

    def _capture_output(self, index: int) -> Callable:
        def capture(module: nn.Module, args: tuple, output: Any) -> None:
            if not SNLPRegularizer._tracing:
                self._outputs[index] = _state(output)

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
        self._forward, self._outputs = None, {}
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @torch._dynamo.disable  # inside a compiled model: traced eagerly, at the first forward of a structure
    def _trace(self, args: tuple, kwargs: dict) -> None:
        """Trace the stack of this input structure and hook its layers' modules."""
        key = _structure(args, kwargs, self.model.training)
        previous, SNLPRegularizer._tracing = SNLPRegularizer._tracing, True  # hooks see no forward meanwhile
        try:
            with contextlib.suppress(ValueError):  # raised by loss(), where no forward is being run
                self._stacks[key] = trace_stack(self.model, args, kwargs, self.config, "SNLPRegularizer")
        finally:
            SNLPRegularizer._tracing = previous
        for position, block in enumerate(self._stacks[key].blocks if key in self._stacks else []):
            if block is not None and id(block) not in self._hooked:
                self._handles.append(block.register_forward_hook(self._capture_output(position)))
                self._hooked.add(id(block))

    def _stack(self, args: tuple, kwargs: dict) -> TracedStack:
        """The traced stack of this input structure; ValueError where the model has none."""
        key = _structure(args, kwargs, self.model.training)
        if key not in self._stacks:
            self._stacks[key] = trace_stack(self.model, args, kwargs, self.config, "SNLPRegularizer")
        return self._stacks[key]

    def loss(self) -> Tensor:
        """weight * warmup(step) * R for the latest captured forward (a scalar; zero when the
        current weight is 0). Consumes the capture: one forward, one loss."""
        scale = self.current_weight
        forward, outputs = self._forward, self._outputs
        self._forward, self._outputs = None, {}
        if scale == 0:
            return torch.zeros((), device=self._device)
        if forward is None:
            raise RuntimeError(
                "SNLPRegularizer.loss(): no forward of the model was captured since the last loss() (run the model "
                "forward first, inside `with reg:` when using the context form)"
            )
        args, kwargs, (device_type, enabled, dtype) = forward
        autocast = torch.autocast(device_type, dtype=dtype, enabled=enabled)
        with autocast:
            stack = self._stack(args, kwargs)
        with autocast, _drawing_nothing(self._device):
            depth = len(stack)
            n_par = self.n_par or (max(1, depth // 2),)
            if max(n_par) > depth:
                container = stack.match.container.removeprefix("L['self'].")
                raise ValueError(
                    f"SNLPRegularizer.n_par must be one or more integers {int_range(1, depth)} (the layers of "
                    f"{container}), got {self.n_par!r}"
                )
            state, inputs = stack.side_inputs(self.model, args, kwargs)
            trace = self._sequential_trace(stack, state, inputs, outputs)
            counts = {n: self.iters[n if self.n_par else None] for n in n_par}
            terms = [term for n in n_par for term in self._gaps(stack, state, inputs, trace, n, counts[n])]
        if not terms:
            return torch.zeros((), device=self._device)
        total = torch.stack(terms).sum()
        n_terms = sum(len(counts[n]) for n in n_par)
        return scale * total if self._paper_stride is not None else scale * total / n_terms

    def _sequential_trace(
        self, stack: TracedStack, state: Tensor, inputs: list[list[Any]], outputs: dict[int, Tensor]
    ) -> list[Tensor]:
        """The forward's layer outputs: those its hooks captured, else recomputed from the layer functions."""
        if len(outputs) == len(stack) and all(
            isinstance(outputs.get(p), Tensor) and outputs[p].shape == state.shape for p in range(len(stack))
        ):
            return [outputs[p] for p in range(len(stack))]
        trace = []
        for p, side in enumerate(inputs):
            state = stack.layer(p, state, side)
            trace.append(state)
        return trace

    def _scored(self, n_par: int) -> list[int]:
        """The positions in the parallel part whose states the loss scores."""
        stride = self.stride if self._paper_stride is None else self._paper_stride
        if stride == 0:
            return [n_par - 1]
        if self._paper_stride is None:
            return list(range(stride - 1, n_par, stride))
        return [j for j in range(1, n_par) if (j + 1) % stride == 0 or j == n_par - 1]

    def _gaps(
        self,
        stack: TracedStack,
        state: Tensor,
        inputs: list[list[Any]],
        trace: list[Tensor],
        n_par: int,
        iters: tuple[int, ...],
    ) -> list[Tensor]:
        """R for the last n_par layers, one per iteration count K in iters with K < n_par (K >= n_par is
        exact: zero): the mean over the scored layers of the per-token relative error."""
        counts = [k for k in iters if k < n_par]
        if not counts:
            return []
        first = len(stack) - n_par

        def layer(p: int) -> Callable[[Tensor], Tensor]:
            return lambda h: stack.layer(p, h, inputs[p])

        surrogate = stack.surrogate(inputs, first)
        if self._paper_stride is not None and surrogate.kind != "mix":
            surrogate = IDENTITY  # the paper's IDN: J = I even where a lambda scales the skip path
        solver_stack = CallableStack([layer(p) for p in range(first, len(stack))], surrogate)
        h0 = trace[first - 1] if first > 0 else state
        scored = self._scored(n_par)
        targets = [trace[first + j] for j in scored]
        if self.detach_target:
            targets = [t.detach() for t in targets]
        paper = self._paper_stride is not None
        if paper and self._paper_stride == 0 and surrogate.kind == "identity":  # the last layer on the block input
            return [relative_error(solver_stack.layer(n_par - 1, h0), targets[0], last_axis=True)]

        def solve(h0: Tensor) -> dict[int, dict[int, Tensor]]:  # the counts share iterations
            return solve_traces(solver_stack, h0, self.config, counts)

        recompute = torch.utils.checkpoint.checkpoint
        traces = recompute(solve, h0, use_reentrant=False) if self.checkpoint else solve(h0)
        gaps = []
        for iters in counts:
            errors = [
                relative_error(traces[iters][j], t, last_axis=paper) for j, t in zip(scored, targets, strict=True)
            ]
            gaps.append(torch.stack(errors).sum() if paper else torch.stack(errors).mean())
        return gaps
