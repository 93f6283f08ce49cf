"""Twin chains: one chain of ops applied to two sibling tensors, run once on their concatenation.

A layer often applies the same ops to two tensors with the same other operands: the rotary
embedding and QK-norm of q and of k are about a dozen ops each. The eager inner compiler pays a
host dispatch per op and call, so `fuse_twin_chains` runs such a pair of chains once on
`torch.cat([a, b], dim)` and splits the results where something else reads them (inductor fuses
these ops by itself, so only graphs run eagerly take this pass). Invariants:

- a chain holds only ops that act on each index of the concatenation dim on its own: pointwise
  ops whose other tensor operands have size 1 there, slices that keep that dim whole, `cat` along
  another dim, transposes of two other dims, and norms over trailing dims that exclude it; twin
  ops have the same target and the same other operands (constants compared exactly, -0.0 is not
  0.0), so each half of a fused value is its twin's value (up to how a CPU kernel's vectorised
  body and scalar tail round);
- before anything changes, the fused chain is run on fake tensors: every fused value must be the
  two sides' values side by side along the concatenation dim, and every half read outside the
  chain must have its original's strides (dims of size 1 aside), so readers see the same layout;
- nothing between the first seed and the last chain op writes in place (a fused op runs where its
  later twin ran, so a write in between would be seen by both sides or by neither);
- every value read outside the chains is the matching half of the fused value, new nodes carry
  their traced values, and nothing is fused unless it saves dispatches.
"""

from __future__ import annotations

import logging
import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Graph, Node

from ...fx import ops
from ...fx.args import leaves, rebuild
from ...fx.values import example_value, traced_tensor
from ...fx.writes import mutated_arg
from ...kernels import rms_norm as _rms_norm  # noqa: F401  (registers snlp::rms_norm)
from ..rewrite.lowering_list import Lowering, Where

logger = logging.getLogger("snlp_compile")

# pointwise ops that broadcast their tensor operands, and those that read only their first operand
_BINARY_FUNCTIONS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.pow,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.pow,
}
_UNARY_FUNCTIONS = {
    operator.neg,
    torch.neg,
    torch.square,
    torch.sqrt,
    torch.rsqrt,
    torch.exp,
    torch.tanh,
    torch.sigmoid,
    torch.relu,
    F.relu,
    F.silu,
    F.gelu,
}
_BINARY_METHODS = {"add", "sub", "mul", "div", "pow"}
_UNARY_METHODS = {"neg", "square", "sqrt", "rsqrt", "exp", "tanh", "sigmoid", "relu", "float", "half", "bfloat16"}
_NORMS = {torch.rms_norm, F.rms_norm, torch.ops.snlp.rms_norm.default, F.layer_norm}
_CATS = ops.CAT
_TRANSPOSES = {torch.transpose, "transpose"}

Twins = dict[Node, Node]  # side a's chain op -> side b's


def _sizes(sizes: Any) -> tuple:
    """Sizes or strides with symbolic entries as their expressions (compared without guarding on them)."""
    return tuple(size if isinstance(size, int) else str(size) for size in sizes)


def _mirror(value: Any, mapping: dict[Node, Any]) -> Any:
    """`value` with every node in `mapping` replaced by what it maps to."""
    return rebuild(value, lambda _, leaf: mapping.get(leaf, leaf) if isinstance(leaf, Node) else leaf)


def _same(x: Any, y: Any) -> bool:
    """x and y are the same operand: the same node, or equal constants (floats to the sign of zero)."""
    if isinstance(x, dict) or isinstance(y, dict):
        both = isinstance(x, dict) and isinstance(y, dict)
        return both and x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)) or isinstance(y, (list, tuple)):
        sequences = isinstance(x, (list, tuple)) and isinstance(y, (list, tuple))
        return sequences and isinstance(x, list) == isinstance(y, list) and len(x) == len(y) and all(map(_same, x, y))
    if isinstance(x, Node) or isinstance(y, Node):
        return x is y
    if isinstance(x, float) and isinstance(y, float):
        return x == y and math.copysign(1.0, x) == math.copysign(1.0, y)
    return type(x) is type(y) and x == y


def _full_slice_at(index: Any, rank: int, dim: int) -> bool:
    """`x[index]` (slices and one Ellipsis only) keeps every dim and takes dim `dim` whole."""
    items = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(i, slice) or i is Ellipsis for i in items) or sum(i is Ellipsis for i in items) > 1:
        return False
    if any(isinstance(leaf, Node) for _, leaf in leaves(items)):
        return False
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = (*items[:at], *([slice(None)] * (rank - len(items) + 1)), *items[at + 1 :])
    items = (*items, *([slice(None)] * (rank - len(items))))
    return len(items) == rank and items[dim] == slice(None)


def _argument(node: Node, position: int, name: str, default: Any = None) -> Any:
    return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)


def _separable(node: Node, chain: set[Node], dim: int, rank: int) -> bool:
    """`node` acts on each index of dim `dim` of its chain operands on its own (module docstring)."""
    out = traced_tensor(node)
    if out is None or out.dim() != rank or mutated_arg(node) is not None:
        return False
    operands = [leaf for _, leaf in leaves((node.args, node.kwargs)) if isinstance(leaf, Node)]
    inside = [leaf for leaf in operands if leaf in chain]
    outside = [traced_tensor(leaf) for leaf in operands if leaf not in chain]
    method = node.op == "call_method"
    if (method and node.target in _UNARY_METHODS) or (not method and node.target in _UNARY_FUNCTIONS):
        return not outside and len(inside) == 1 and node.args[:1] == (inside[0],)
    if (method and node.target in _BINARY_METHODS) or (not method and node.target in _BINARY_FUNCTIONS):
        # the chain operands are not broadcast; the other tensors broadcast along dim (size 1 there,
        # or no such dim); non-tensor operands are constants
        shapes = [traced_tensor(leaf) for leaf in inside]
        if any(t is None or _sizes(t.shape) != _sizes(out.shape) for t in shapes):
            return False
        return all(t is not None and (t.dim() < rank - dim or _sizes(t.shape)[dim - rank] == 1) for t in outside)
    if node.target in _TRANSPOSES:  # the other two dims trade places; dim stays where it is
        dims = [_argument(node, 1, "dim0"), _argument(node, 2, "dim1")]
        return all(isinstance(d, int) for d in dims) and dim not in {d % rank for d in dims}
    if method:
        return False
    if node.target is operator.getitem:
        return not outside and _full_slice_at(node.args[1], rank, dim)
    if node.target in _CATS:
        parts, cat_dim = _argument(node, 0, "tensors"), _argument(node, 1, "dim", 0)
        return not outside and all(p in chain for p in parts) and isinstance(cat_dim, int) and cat_dim % rank != dim
    if node.target in _NORMS:
        shape = _argument(node, 1, "normalized_shape")
        return node.args[:1] == tuple(inside[:1]) and isinstance(shape, (list, tuple)) and dim < rank - len(shape)
    return False


def _twin_of(node: Node, twins: Twins, taken: set[Node], order: dict[Node, int]) -> Node | None:
    """The first node (in graph order) that applies `node`'s op to the twins of its chain operands."""
    args, kwargs = _mirror(node.args, twins), _mirror(node.kwargs, twins)
    readers = {user for arg in node.all_input_nodes if arg in twins for user in twins[arg].users}
    for other in sorted(readers, key=order.__getitem__):
        same_op = other not in taken and (other.op, other.target) == (node.op, node.target)
        if same_op and _same(other.args, args) and _same(other.kwargs, kwargs):
            return other
    return None


def _grow(graph: Graph, a: Node, b: Node, dim: int, order: dict[Node, int]) -> Twins:
    """Twin ops (side a -> side b) reachable from the seeds (a, b), fused along `dim`."""
    rank = traced_tensor(a).dim()
    twins, taken = {a: b}, {a, b}
    for node in graph.nodes:
        if node in taken or not any(arg in twins for arg in node.all_input_nodes):
            continue
        if any(arg in taken and arg not in twins for arg in node.all_input_nodes):  # reads side b too
            continue
        if not _separable(node, set(twins), dim, rank):
            continue
        other = _twin_of(node, twins, taken, order)
        if other is None or traced_tensor(other) is None:
            continue
        theirs, mine = traced_tensor(other), traced_tensor(node)
        so, sn = _sizes(theirs.shape), _sizes(mine.shape)
        if so[:dim] + so[dim + 1 :] != sn[:dim] + sn[dim + 1 :] or theirs.dtype != mine.dtype:
            continue
        twins[node] = other
        taken.update((node, other))
    del twins[a]
    return twins


def _outside_readers(node: Node, chain: set[Node]) -> list[Node]:
    return [user for user in node.users if user not in chain]


def _gain(a: Node, b: Node, twins: Twins, order: dict[Node, int], writes: list[int]) -> int:
    """Dispatches saved: one per fused pair, less the concatenation and one split per pair read
    outside; 0 when a value is read outside before its twin is computed (its half would come too
    late) or when something writes in place between the first seed and the last chain op."""
    chain = set(twins) | set(twins.values())
    first, last = min(order[a], order[b]), max((order[n] for n in chain), default=0)
    if not twins or any(first <= at <= last for at in writes):
        return 0
    splits = 0
    for node, other in twins.items():
        readers = _outside_readers(node, chain) + _outside_readers(other, chain)
        if any(order[r] < max(order[node], order[other]) for r in readers):
            return 0
        splits += bool(readers)
    return len(twins) - 1 - splits


def _seed_dims(a: Node, b: Node) -> list[int]:
    """Dims along which a and b could be concatenated: where their shapes differ, else any; only
    dims of static size (the split sizes are constants of the graph)."""
    va, vb = traced_tensor(a), traced_tensor(b)
    if va is None or vb is None or (va.dim(), va.dtype, va.device) != (vb.dim(), vb.dtype, vb.device):
        return []
    sa, sb = _sizes(va.shape), _sizes(vb.shape)
    differ = [d for d in range(va.dim()) if sa[d] != sb[d]]
    dims = differ if len(differ) == 1 else (list(range(va.dim())) if not differ else [])
    return [d for d in dims if isinstance(sa[d], int) and isinstance(sb[d], int)]


def _candidates(graph: Graph) -> list[tuple[int, Node, Node, int, Twins]]:
    """(gain, seed a, seed b, dim, twins) of every pair of chains that saves dispatches, best first."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    writes = [order[n] for n in graph.nodes if mutated_arg(n) is not None]
    readers: dict[tuple, list[Node]] = {}
    for node in graph.nodes:
        if traced_tensor(node) is not None:
            for key in dict.fromkeys((user.op, user.target) for user in node.users):
                readers.setdefault(key, []).append(node)
    found, seen = [], set()
    for nodes in readers.values():
        for i, a in enumerate(nodes):
            for b in nodes[i + 1 :]:
                if (a, b) in seen or not any(_twin_of(user, {a: b}, {a, b}, order) for user in a.users):
                    continue
                seen.add((a, b))
                for dim in _seed_dims(a, b):
                    twins = _grow(graph, a, b, dim, order)
                    if (gain := _gain(a, b, twins, order, writes)) > 0:
                        found.append((gain, a, b, dim, twins))
    found.sort(key=lambda c: -c[0])  # stable: among equal gains, the first pair and the lowest dim
    return found


def _call(node: Node, args: tuple, kwargs: dict) -> Any:
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _strides(value: Tensor) -> tuple:
    """value's strides where its size is not 1 (a size-1 dim's stride is never used)."""
    return _sizes(stride for size, stride in zip(value.shape, value.stride(), strict=True) if size != 1)


def _simulate(a: Node, b: Node, dim: int, twins: Twins) -> dict[Node, Any] | None:
    """Traced values of the fused chain (seed a -> the concatenation, each side-a op -> its fused op,
    (op, "halves") -> its split), or None where a fused value would not be the two sides' values side
    by side along dim, or a half read outside would have other strides than its original."""
    chain = set(twins) | set(twins.values())
    # the mode the traced values belong to (not the tracing context's: the backend may run in another)
    mode = getattr(traced_tensor(a), "fake_mode", None) or FakeTensorMode(allow_non_fake_inputs=True)
    values: dict[Any, Any] = {}
    try:
        with mode:
            values[a] = torch.cat([traced_tensor(a), traced_tensor(b)], dim=dim)
            for node, other in twins.items():
                mapping = {n: values.get(n, example_value(n)) for n in node.all_input_nodes}
                value = _call(node, _mirror(node.args, mapping), _mirror(node.kwargs, mapping))
                mine, theirs = traced_tensor(node), traced_tensor(other)
                expected = list(_sizes(mine.shape))
                expected[dim] = mine.shape[dim] + theirs.shape[dim]
                if not isinstance(value, Tensor) or _sizes(value.shape) != tuple(expected) or value.dtype != mine.dtype:
                    return None
                values[node] = value
                if _outside_readers(node, chain) or _outside_readers(other, chain):
                    halves = torch.split(value, [mine.shape[dim], theirs.shape[dim]], dim=dim)
                    if _strides(halves[0]) != _strides(mine) or _strides(halves[1]) != _strides(theirs):
                        return None
                    values[(node, "halves")] = halves
    except Exception as error:  # noqa: BLE001  (an op the fake tensors reject is an op not to fuse)
        logger.debug("snlp: twin chains from %s and %s not fused: %s", a.name, b.name, error)
        return None
    return values


def _fuse(graph: Graph, a: Node, b: Node, dim: int, twins: Twins, values: dict[Node, Any]) -> None:
    order = {node: i for i, node in enumerate(graph.nodes)}
    chain = set(twins) | set(twins.values())

    def add(op: str, target: Any, args: tuple, kwargs: dict, value: Any) -> Node:
        node = graph.create_node(op, target, args, kwargs)
        node.meta["example_value"] = value
        return node

    with graph.inserting_after(max(a, b, key=order.__getitem__)):
        fused = {a: add("call_function", torch.cat, ([a, b],), {"dim": dim}, values[a])}
    for node in twins:  # in graph order: _grow adds them so
        other = twins[node]
        with graph.inserting_before(max(node, other, key=order.__getitem__)):
            args, kwargs = _mirror(node.args, fused), _mirror(node.kwargs, fused)
            fused[node] = add(node.op, node.target, args, kwargs, values[node])
            if (node, "halves") not in values:
                continue
            halves = values[(node, "halves")]
            sizes = [half.shape[dim] for half in halves]
            split = add("call_function", torch.split, (fused[node], sizes), {"dim": dim}, halves)
            for k, original in enumerate((node, other)):
                half = add("call_function", operator.getitem, (split, k), {}, halves[k])
                original.replace_all_uses_with(half, delete_user_cb=lambda user: user not in chain)
    for node in sorted(chain, key=order.__getitem__, reverse=True):
        graph.erase_node(node)


def fuse_twin_chains(graph: Graph) -> int:
    """Fuse the twin chains of `graph` in place (module docstring); returns how many were fused."""
    fused = 0
    while True:
        for _, a, b, dim, twins in _candidates(graph):
            if (values := _simulate(a, b, dim, twins)) is not None:
                _fuse(graph, a, b, dim, twins, values)
                fused += 1
                break
        else:
            break
    if fused:
        graph.lint()
    return fused


def _layer_graphs(graph: Graph, where: Where) -> None:
    if where is not Where.OUTSIDE:
        fuse_twin_chains(graph)


TWIN_CHAINS = Lowering("twin chains", graph_pass=_layer_graphs)
