"""Twin chains: one chain of ops applied to two sibling tensors, run once on their concatenation.

A layer often applies the same ops to two tensors with the same other operands: the rotary
embedding and QK-norm of q and of k are about a dozen ops each. The eager inner compiler pays a
host dispatch per op and call, so `fuse_twin_chains` runs such a pair of chains once on
`torch.cat([a, b], dim)` and splits the results where something else reads them (inductor fuses
these ops by itself, so only graphs run eagerly take this pass). Invariants:

- a chain holds only ops that act on each index of the concatenation dim on its own: pointwise
  ops whose other tensor operands have size 1 there, slices that keep that dim whole, `cat` along
  another dim, and norms over trailing dims that exclude it; every pair of twin ops has the same
  target and the same other operands, and the two sides' values differ in shape only along the
  concatenation dim, so each half of a fused op's value is the value of its twin op;
- every value read outside the chains is the matching half of the fused value (`torch.split`:
  views, so elementwise the same tensor), and nothing is fused unless it saves dispatches.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import Graph, Node

from .detect import example_value, mutated_arg

_POINTWISE_FUNCTIONS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    operator.pow,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.neg,
    torch.pow,
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
_POINTWISE_METHODS = {
    "add",
    "sub",
    "mul",
    "div",
    "neg",
    "pow",
    "square",
    "sqrt",
    "rsqrt",
    "exp",
    "tanh",
    "sigmoid",
    "relu",
    "float",
    "half",
    "bfloat16",
    "to",
    "contiguous",
}
_NORMS = {torch.rms_norm, F.rms_norm, torch.ops.snlp.rms_norm.default, F.layer_norm}
_CATS = {torch.cat, torch.concat}
_TRANSPOSES = {torch.transpose, "transpose"}


def _tensor(node: Any) -> Tensor | None:
    value = example_value(node) if isinstance(node, Node) else None
    return value if isinstance(value, Tensor) else None


def _shape(t: Tensor) -> tuple:
    """t's shape with symbolic sizes as their expressions (compared without guarding on them)."""
    return tuple(size if isinstance(size, int) else str(size) for size in t.shape)


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, slice):
        yield from (value.start, value.stop, value.step)
    else:
        yield value


def _mirror(value: Any, twin: dict[Node, Node]) -> Any:
    """`value` with every chain node replaced by its twin."""
    if isinstance(value, (list, tuple)):
        return type(value)(_mirror(item, twin) for item in value)
    return twin.get(value, value) if isinstance(value, Node) else value


def _full_slice_at(index: Any, rank: int, dim: int) -> bool:
    """`x[index]` (slices and one Ellipsis only) keeps every dim and takes dim `dim` whole."""
    items = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(i, slice) or i is Ellipsis for i in items) or sum(i is Ellipsis for i in items) > 1:
        return False
    if any(isinstance(leaf, Node) for leaf in _leaves(items)):
        return False
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = (*items[:at], *([slice(None)] * (rank - len(items) + 1)), *items[at + 1 :])
    items = (*items, *([slice(None)] * (rank - len(items))))
    return len(items) == rank and items[dim] == slice(None)


def _argument(node: Node, position: int, name: str) -> Any:
    return node.args[position] if len(node.args) > position else node.kwargs.get(name)


def _separable(node: Node, chain: set[Node], dim: int, rank: int) -> bool:
    """`node` acts on each index of dim `dim` of its chain operands on its own (module docstring)."""
    out = _tensor(node)
    if out is None or out.dim() != rank or mutated_arg(node) is not None:
        return False
    operands = list(_leaves((node.args, tuple(node.kwargs.values()))))
    inside = [leaf for leaf in operands if isinstance(leaf, Node) and leaf in chain]
    outside = [_tensor(leaf) for leaf in operands if isinstance(leaf, Node) and leaf not in chain]
    if node.op == "call_method" and node.target in _POINTWISE_METHODS or node.target in _POINTWISE_FUNCTIONS:
        # the chain operands are not broadcast; the other tensors broadcast along dim (size 1 there, or
        # no such dim); non-tensor operands are constants
        if any(_tensor(leaf) is None or _shape(_tensor(leaf)) != _shape(out) for leaf in inside):
            return False
        return all(t is not None and (t.dim() < rank - dim or _shape(t)[dim - rank] == 1) for t in outside)
    if node.target in _TRANSPOSES:  # the other two dims trade places; dim stays where it is
        dims = [_argument(node, 1, "dim0"), _argument(node, 2, "dim1")]
        return all(isinstance(d, int) for d in dims) and dim not in {d % rank for d in dims}
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return not outside and _full_slice_at(node.args[1], rank, dim)
    if node.target in _CATS:
        parts, cat_dim = _argument(node, 0, "tensors"), _argument(node, 1, "dim") or 0
        return not outside and all(p in chain for p in parts) and cat_dim % rank != dim
    if node.target in _NORMS:
        shape = _argument(node, 1, "normalized_shape")
        return node.args[0] in chain and isinstance(shape, (list, tuple)) and dim < rank - len(shape)
    return False


def _twin_of(node: Node, twin: dict[Node, Node], taken: set[Node]) -> Node | None:
    """The node that applies `node`'s op to the twins of its chain operands, if there is one."""
    args, kwargs = _mirror(node.args, twin), _mirror(node.kwargs, twin)
    readers = {user for arg in node.all_input_nodes if arg in twin for user in twin[arg].users}
    for other in readers:
        same_op = other not in taken and (other.op, other.target) == (node.op, node.target)
        if same_op and other.args == args and other.kwargs == kwargs:
            return other
    return None


def _grow(graph: Graph, a: Node, b: Node, dim: int) -> dict[Node, Node]:
    """Twin ops (side a -> side b) reachable from the seeds (a, b), fused along `dim`."""
    rank = _tensor(a).dim()
    twin, taken = {a: b}, {a, b}
    for node in graph.nodes:
        if node in taken or not any(arg in twin for arg in node.all_input_nodes):
            continue
        if any(arg in taken and arg not in twin for arg in node.all_input_nodes):  # reads side b too
            continue
        if not _separable(node, set(twin), dim, rank):
            continue
        other = _twin_of(node, twin, taken)
        vo, vn = _tensor(other), _tensor(node)
        if other is None or vo is None or vo.dtype != vn.dtype or vo.dim() != rank:
            continue
        so, sn = _shape(vo), _shape(vn)
        if so[:dim] + so[dim + 1 :] != sn[:dim] + sn[dim + 1 :]:
            continue
        twin[node] = other
        taken.update((node, other))
    del twin[a]
    return twin


def _outside_readers(node: Node, chain: set[Node]) -> list[Node]:
    return [user for user in node.users if user not in chain]


def _gain(twin: dict[Node, Node], order: dict[Node, int]) -> int:
    """Dispatches saved: one per fused pair, less the concatenation and one split per value read
    outside; 0 when a value is read outside before its twin is computed (its half would come too late)."""
    chain = set(twin) | set(twin.values())
    splits = 0
    for a, b in twin.items():
        readers = _outside_readers(a, chain) + _outside_readers(b, chain)
        if any(order[r] < max(order[a], order[b]) for r in readers):
            return 0
        splits += bool(readers)
    return len(twin) - 1 - splits


def _seed_dims(a: Node, b: Node) -> list[int]:
    """Dims along which a and b could be concatenated: where their shapes differ, else any; only
    dims of static size (the split sizes are constants of the graph)."""
    va, vb = _tensor(a), _tensor(b)
    if va is None or vb is None or (va.dim(), va.dtype, va.device) != (vb.dim(), vb.dtype, vb.device):
        return []
    sa, sb = _shape(va), _shape(vb)
    differ = [d for d in range(va.dim()) if sa[d] != sb[d]]
    dims = differ if len(differ) == 1 else (list(range(va.dim())) if not differ else [])
    return [d for d in dims if isinstance(sa[d], int) and isinstance(sb[d], int)]


def _best_chain(graph: Graph) -> tuple[Node, Node, int, dict[Node, Node]] | None:
    """The seed pair, dim and twin ops that save the most dispatches (None when nothing saves any)."""
    readers: dict[tuple, list[Node]] = {}
    for node in graph.nodes:
        if _tensor(node) is not None:
            for key in {(user.op, user.target) for user in node.users}:
                readers.setdefault(key, []).append(node)
    order = {node: i for i, node in enumerate(graph.nodes)}
    best, best_gain, seen = None, 0, set()
    for nodes in readers.values():
        for i, a in enumerate(nodes):
            for b in nodes[i + 1 :]:
                if (a, b) in seen or not any(_twin_of(user, {a: b}, {a, b}) for user in a.users):
                    continue
                seen.add((a, b))
                for dim in _seed_dims(a, b):
                    twin = _grow(graph, a, b, dim)
                    if (gain := _gain(twin, order)) > best_gain:
                        best, best_gain = (a, b, dim, twin), gain
    return best


def _fuse(graph: Graph, a: Node, b: Node, dim: int, twin: dict[Node, Node]) -> None:
    order = {node: i for i, node in enumerate(graph.nodes)}
    chain = set(twin) | set(twin.values())
    with graph.inserting_after(max(a, b, key=order.__getitem__)):
        fused = {a: graph.call_function(torch.cat, ([a, b],), {"dim": dim})}
    for node in sorted(twin, key=order.__getitem__):
        other = twin[node]
        with graph.inserting_before(max(node, other, key=order.__getitem__)):
            args, kwargs = (_mirror(value, fused) for value in (node.args, node.kwargs))
            fused[node] = graph.create_node(node.op, node.target, args, kwargs)
            if not (_outside_readers(node, chain) or _outside_readers(other, chain)):
                continue
            sizes = [_tensor(node).shape[dim], _tensor(other).shape[dim]]
            halves = graph.call_function(torch.split, (fused[node], sizes), {"dim": dim})
            for k, original in enumerate((node, other)):
                half = graph.call_function(operator.getitem, (halves, k))
                original.replace_all_uses_with(half, delete_user_cb=lambda user: user not in chain)
    for node in sorted(chain, key=order.__getitem__, reverse=True):
        graph.erase_node(node)


def fuse_twin_chains(graph: Graph) -> int:
    """Fuse the twin chains of `graph` in place (module docstring); returns how many were fused."""
    fused = 0
    while (best := _best_chain(graph)) is not None:
        _fuse(graph, *best)
        fused += 1
    if fused:
        graph.lint()
    return fused
