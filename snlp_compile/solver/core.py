"""The structured-Newton solve on plain callables (no FX): surrogates, the chunk schedule, IDN and HCN.

A *layer stack* is anything with `len(stack)`, `stack.layer(i, h) -> h'` (one layer) and
`stack.layers(start, hs) -> hs'` (layers start..start+n-1 applied to hs[0..n-1] at once), plus a
`surrogate` (one Jacobian surrogate per layer; sliced by position). The solve reads the surrogate of
layers right after evaluating them, so a stack whose J depends on the state (dynamic mixing) gives
J at the current iterate: `stack.surrogate` then reflects each layer's latest evaluation. Invariants:

- `solve` with fuse = 1 and iters >= the largest block size (>= size - 1 with init="batch_fwd")
  reproduces `reference.sequential` up to float rounding, for every surrogate and damping, and
  puts every inf and NaN the layers compute where `sequential` does. Two rules keep non-finite values exact:
  a group's new input is its predecessor's output plus a correction, F_g(u_g) + c A_g e_g (never
  old input + change, which is inf - inf where an old input is infinite), and a NaN residual
  (F_g(u_g) - u_{g+1} with both the same infinity) counts as 0, so the corrections of a
  converged prefix are exactly 0. For finite values the NaN rule changes nothing, and compiled it
  is one select fused into the residual's subtraction.
- A block runs at most `exact_iters` iterations (its super-layer count, one fewer with
  init="batch_fwd"): there the trace is at its fixed point, and more iterations change nothing.
- One iteration with init="h0" and the identity surrogate is the prefix-sum formula
  `out = x + sum_i (f_i(x) - x)` over each block.
- Nothing here mutates its inputs.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from ..config import SNLPConfig

SURROGATE_KINDS = ("identity", "scale", "mix")


@dataclass(frozen=True)
class Surrogate:
    """Per-layer Jacobian surrogates J_l of a stack of n layers.

    kind "identity": J = I (values None); "scale": J = a_l * I (values [n]); "mix": J = H_l acting
    on the stream axis (values [n, M, M], or [n, ..., M, M] with a matrix per batch element or token of
    a state [..., M, d], broadcast from the right). `stream` = (dim, inner) says where the M streams are in a
    state: dim `dim` (negative) of the state, split as (outer, M, inner), so the default (-2, 1) is a
    state [..., M, d] with J h = H_l @ h, and (-3, 1) streams folded into the batch of [B * M, T, d].
    """

    kind: str = "identity"
    values: Tensor | None = None
    stream: tuple[int, int] = (-2, 1)

    def __post_init__(self) -> None:
        if self.kind not in SURROGATE_KINDS:
            raise ValueError(f"Surrogate.kind must be one of {SURROGATE_KINDS}, got {self.kind!r}")
        if (self.kind == "identity") != (self.values is None):
            raise ValueError("Surrogate: values must be None exactly for the identity kind")
        if self.kind == "scale" and self.values.dim() != 1:
            raise ValueError(f"scale surrogate values must be [n], got {tuple(self.values.shape)}")
        if self.kind == "mix" and (self.values.dim() < 3 or self.values.shape[-1] != self.values.shape[-2]):
            raise ValueError(f"mix surrogate values must be [n, ..., M, M], got {tuple(self.values.shape)}")

    def __getitem__(self, index: slice) -> Surrogate:
        return self if self.values is None else Surrogate(self.kind, self.values[index], self.stream)

    def apply(self, x: Tensor) -> Tensor:
        """J_i x_i for every i along the leading axis of x (which matches the values' length)."""
        if self.kind == "identity":
            return x
        if self.kind == "scale":
            return self.values.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1))) * x
        mix = self.values.to(x.dtype)
        if self.stream == (-2, 1):
            return mix.reshape(mix.shape[0], *([1] * (x.dim() - mix.dim())), *mix.shape[1:]) @ x
        dim, inner = self.stream
        streams = x.unflatten(dim, (-1, mix.shape[-1], inner)).movedim(dim - 1, -1)  # [n, ..., M]
        mixed = torch.einsum("n...j,nij->n...i", streams, mix)
        return mixed.movedim(-1, dim - 1).reshape(x.shape)

    def compose(self, sizes: Sequence[int]) -> tuple[Surrogate, Surrogate]:
        """For consecutive groups of `sizes` layers: (W, A) with W_j = product of the J of the
        group members after j (identity for the last member) and A_g = J of the whole group."""
        if self.kind == "identity":
            return self, self
        eye = torch.ones((), dtype=self.values.dtype, device=self.values.device)
        if self.kind == "mix":
            eye = torch.eye(self.values.shape[-1], dtype=self.values.dtype, device=self.values.device)
            eye = eye.expand(self.values.shape[1:])
        after, whole, start = [], [], 0
        for size in sizes:
            acc = eye
            members = []
            for j in reversed(range(start, start + size)):
                members.append(acc)
                acc = acc @ self.values[j] if self.kind == "mix" else acc * self.values[j]
            after.extend(reversed(members))
            whole.append(acc)
            start += size
        return (
            Surrogate(self.kind, torch.stack(after), self.stream),
            Surrogate(self.kind, torch.stack(whole), self.stream),
        )


IDENTITY = Surrogate()


class LayerStack(Protocol):
    """What the solver needs from a stack of layers (see the module docstring)."""

    surrogate: Surrogate

    def __len__(self) -> int: ...

    def layer(self, index: int, h: Tensor) -> Tensor: ...

    def layers(self, start: int, hs: Tensor) -> Tensor: ...


class CallableStack:
    """A stack of arbitrary callables `f_l(h) -> h`; batched evaluation is a loop."""

    def __init__(self, fns: Sequence[Callable[[Tensor], Tensor]], surrogate: Surrogate = IDENTITY):
        self.fns = list(fns)
        self.surrogate = surrogate

    def __len__(self) -> int:
        return len(self.fns)

    def layer(self, index: int, h: Tensor) -> Tensor:
        return self.fns[index](h)

    def layers(self, start: int, hs: Tensor) -> Tensor:
        return torch.stack([self.fns[start + i](h) for i, h in enumerate(hs)])


def split_even(total: int, parts: int) -> list[int]:
    """`parts` consecutive sizes summing to `total`, differing by at most one (larger first)."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def schedule(num_layers: int, config: SNLPConfig) -> list[tuple[int, list[int]]]:
    """The chunk schedule: (first layer, super-layer sizes) per Newton block, after n_seq."""
    config.check_depth(num_layers)
    out, start = [], config.n_seq
    for size in split_even(num_layers - config.n_seq, config.blocks):
        groups = [config.fuse] * (size // config.fuse) + ([size % config.fuse] if size % config.fuse else [])
        out.append((start, groups))
        start += size
    return out


def _super_layers(stack: LayerStack, start: int, sizes: list[int], u: Tensor) -> Tensor:
    """F_g(u_g) for consecutive super-layers of `sizes` layers (all members see the group input):
    F_g(u) = A_g u + sum_j W_j (f_j(u) - J_j u). Equals the layers themselves when sizes are 1."""
    n = sum(sizes)
    if n == len(sizes):
        return stack.layers(start, u)
    group_of = torch.tensor([g for g, size in enumerate(sizes) for _ in range(size)], device=u.device)
    member_inputs = u.index_select(0, group_of)
    evaluated = stack.layers(start, member_inputs)
    per_layer = stack.surrogate[start : start + n]  # after the evaluation: J at the members' inputs
    after, whole = per_layer.compose(sizes)
    updates = after.apply(evaluated - per_layer.apply(member_inputs))
    return whole.apply(u).index_add(0, group_of, updates)


def _carries(whole: Surrogate, c: float, r: Tensor, zero: Tensor) -> Iterator[Tensor]:
    """p_1..p_C, one at a time: p_g = c A_g e_g is what the change e_g of group g's input adds to its
    output (e_1 = 0, e_{g+1} = p_g + r_g); `zero` is a zero state."""
    p = zero
    yield p
    for g in range(r.shape[0]):
        p = c * whole[g + 1 : g + 2].apply((p + r[g]).unsqueeze(0))[0]
        yield p


def _scan(whole: Surrogate, c: float, outputs: Tensor, r: Tensor) -> Tensor:
    """The corrected super-layer outputs F_g(u_g) + p_g, all C of them (the carries are an exclusive
    prefix sum in the identity case without damping)."""
    if whole.kind == "identity" and c == 1.0:
        return torch.cat([outputs[:1], outputs[1:] + torch.cumsum(r, dim=0)])
    return outputs + torch.stack(list(_carries(whole, c, r, torch.zeros_like(outputs[0]))))


def _scan_last(whole: Surrogate, c: float, last: Tensor, r: Tensor) -> Tensor:
    """The block output F_C(u_C) + p_C alone (`last` is F_C(u_C)): no intermediate carry is kept.
    In the identity case without damping p_C is a sum over the groups: traced for a compiler (fake
    tensors), an unrolled chain of adds, which inductor fuses into one coalesced pointwise kernel (a
    sum over the leading dim compiles to a slower outer reduction); on real tensors (eager) one sum
    kernel. The two add in different orders, so they differ by rounding."""
    if whole.kind == "identity" and c == 1.0:
        return functools.reduce(operator.add, r.unbind(0), last) if is_fake(r) else last + r.sum(dim=0)
    *_, p = _carries(whole, c, r, torch.zeros_like(last))
    return last + p


def _block_surrogate(stack: LayerStack, start: int, sizes: list[int]) -> Surrogate:
    """A_g, the surrogate of each super-layer of the block as a whole (at the latest evaluation)."""
    return stack.surrogate[start : start + sum(sizes)].compose(sizes)[1]


def _initial_inputs(stack: LayerStack, start: int, sizes: list[int], x: Tensor, config: SNLPConfig) -> Tensor:
    """The super-layer inputs [C] of iteration 1: x for every group ("h0": an expand, so one tensor
    shared by all), or the groups before the last evaluated once on x ("batch_fwd")."""
    u = x.unsqueeze(0).expand(len(sizes), *x.shape)
    if config.init == "batch_fwd" and len(sizes) > 1:
        u = torch.cat([x.unsqueeze(0), _super_layers(stack, start, sizes[:-1], u[:-1])])
    return u


def _evaluate(stack: LayerStack, start: int, sizes: list[int], u: Tensor) -> tuple[Tensor, Tensor]:
    """(F_g(u_g) for all C groups, r_g = F_g(u_g) - u_{g+1} for the C - 1 before the last): the
    outputs, and how far the inputs are from a trace. A NaN residual is 0 (module docstring)."""
    outputs = _super_layers(stack, start, sizes, u)
    return outputs, torch.nan_to_num(outputs[:-1] - u[1:], nan=0.0, posinf=math.inf, neginf=-math.inf)


def exact_iters(groups: int, init: str) -> int:
    """Iterations after which a block of `groups` super-layers is at its fixed point: each one fixes
    one more input, and init="batch_fwd" starts with two of them right (u_1 = x, u_2 = F_1(x))."""
    return max(1, groups - (init == "batch_fwd"))


def useful_iters(num_layers: int, config: SNLPConfig) -> int:
    """The most iterations a block of this stack's schedule runs (`exact_iters` of the block with the
    most super-layers): a larger config.iters gives the same solve."""
    return max(exact_iters(len(sizes), config.init) for _, sizes in schedule(num_layers, config))


def _block_iterates(
    stack: LayerStack, start: int, sizes: list[int], x: Tensor, config: SNLPConfig
) -> Iterator[tuple[Tensor, Tensor]]:
    """Newton iterations over one block, without end: (block output, super-layer inputs [C]) after
    iteration 1, 2, ... The block input u_1 = x never changes; u_{g+1} becomes F_g(u_g) + p_g."""
    u = _initial_inputs(stack, start, sizes, x, config)
    c = 1.0 - config.damping
    while True:
        outputs, r = _evaluate(stack, start, sizes, u)
        corrected = _scan(_block_surrogate(stack, start, sizes), c, outputs, r)
        u = torch.cat([u[:1], corrected[:-1]])
        yield corrected[-1], u


def _solve_block(
    stack: LayerStack,
    start: int,
    sizes: list[int],
    x: Tensor,
    config: SNLPConfig,
    iters: int,
    inside: Sequence[int] = (),
) -> tuple[Tensor, dict[int, Tensor]]:
    """K >= 1 Newton iterations over one block (at most `exact_iters`); returns the block output and the
    states after the layers in `inside` (super-layer ends before the block's last). Without those, the
    last iteration computes only the output's correction (`_scan_last`), as nothing reads its inputs."""
    iters = min(iters, exact_iters(len(sizes), config.init))
    if iters == 1:
        u = _initial_inputs(stack, start, sizes, x, config)
    else:
        u = next(itertools.islice(_block_iterates(stack, start, sizes, x, config), iters - 2, None))[1]
    outputs, r = _evaluate(stack, start, sizes, u)
    whole, c = _block_surrogate(stack, start, sizes), 1.0 - config.damping
    if not inside:
        return _scan_last(whole, c, outputs[-1], r), {}
    corrected = _scan(whole, c, outputs, r)
    ends = [start + e - 1 for e in itertools.accumulate(sizes)]
    return corrected[-1], {p: corrected[ends.index(p)] for p in inside}


def pinned_states(num_layers: int, config: SNLPConfig) -> set[int]:
    """The layers after which the solve has a state of its own (`solve_states` can return it): every
    sequential layer and the last layer of every super-layer; a state inside a fused super-layer is not."""
    pinned = set(range(config.n_seq))
    for start, sizes in schedule(num_layers, config):
        pinned.update(start + e - 1 for e in itertools.accumulate(sizes))
    return pinned


def solve_traces(
    stack: LayerStack, h0: Tensor, config: SNLPConfig, iters: Iterable[int]
) -> dict[int, dict[int, Tensor]]:
    """`solve_trace` for several iteration counts at once: {K: trace}, each equal to its own solve.

    Counts whose solves reach a block with the same input share that block's iterations (in the
    first block they all do), so K = 1 and 2 cost two iterations of it, not three; counts past a
    block's `exact_iters` share its last one.
    """
    counts = sorted(set(iters))
    if not counts or counts[0] < 1:
        raise ValueError(f"iteration counts must be integers >= 1, got {counts}")
    traces: dict[int, dict[int, Tensor]] = {k: {} for k in counts}
    h = h0
    for i in range(config.n_seq):
        h = stack.layer(i, h)
        for trace in traces.values():
            trace[i] = h
    inputs = dict.fromkeys(counts, h)
    for start, sizes in schedule(len(stack), config):
        ends = list(itertools.accumulate(sizes))
        cap = exact_iters(len(sizes), config.init)
        sharing: dict[int, list[int]] = {}  # the counts whose solves enter this block with one tensor
        for k in counts:
            sharing.setdefault(id(inputs[k]), []).append(k)
        for ks in sharing.values():
            iterates = _block_iterates(stack, start, sizes, inputs[ks[0]], config)
            for k, (out, u) in enumerate(itertools.islice(iterates, min(ks[-1], cap)), start=1):
                for count in (count for count in ks if min(count, cap) == k):
                    traces[count].update({start + e - 1: u[g + 1] for g, e in enumerate(ends[:-1])})
                    traces[count][start + ends[-1] - 1] = out
                    inputs[count] = out
    return traces


def solve_trace(stack: LayerStack, h0: Tensor, config: SNLPConfig, iters: int | None = None) -> dict[int, Tensor]:
    """The SNLP solve, returning the state after each layer it pins down: {layer index: h}.

    Every sequential layer and every super-layer boundary appears; the last key is len-1.
    `iters` (>= 1) overrides config.iters.
    """
    iters = config.iters if iters is None else iters
    return solve_traces(stack, h0, config, [iters])[iters]


def solve_states(stack: LayerStack, h0: Tensor, config: SNLPConfig, positions: Sequence[int]) -> list[Tensor]:
    """The SNLP solve's state after each layer of `positions` (each in `pinned_states`; ValueError
    otherwise), in one solve: exact where `solve` is, and the states before the last are taps."""
    taps = set(positions) - {len(stack) - 1}  # the final state is always pinned: `solve` checks nothing
    unpinned = sorted(taps - pinned_states(len(stack), config)) if taps else []
    if unpinned:
        raise ValueError(f"layers {unpinned} end inside a fused super-layer: the solve has no state after them")
    wanted, states, h = set(positions), {}, h0
    for i in range(config.n_seq):
        h = stack.layer(i, h)
        states[i] = h
    for start, sizes in schedule(len(stack), config):
        end = start + sum(sizes) - 1
        h, found = _solve_block(stack, start, sizes, h, config, config.iters, sorted(wanted & set(range(start, end))))
        states.update(found)
        states[end] = h
    return [states[p] for p in positions]


def solve(stack: LayerStack, h0: Tensor, config: SNLPConfig) -> Tensor:
    """The SNLP solve: the final state after all layers."""
    return solve_states(stack, h0, config, [len(stack) - 1])[0]
