"""What a node writes in place, and where the memory it writes comes from.

Invariants: `written_arg` finds every write a call declares (name, `inplace=True`, `out=`, aten
schema) and, for torch ops, the writes their aten decomposition declares (`_observed_write`: a
probe on fake copies, cached per graph and call signature); `alias_roots` follows memory, not
data flow: a view or an in-place op's result leads back to the tensor that allocated it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import weakref
from typing import Any

import torch
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx import Graph, Node
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .args import first_node, flat_args, leaves, map_args
from .ops import aten_name
from .values import example_value, freeze, value_signature

_INPLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


@functools.cache
def _inplace_position(target: Any) -> int | None:
    """The position of a Python function's `inplace` parameter (F.relu, F.dropout, ...), if it has one."""
    try:
        parameters = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None
    return parameters.index("inplace") if "inplace" in parameters else None


def _inplace_flag(node: Node) -> bool:
    """The call passes inplace=True (by keyword or position) to a function that takes that flag."""
    if node.kwargs.get("inplace") is True:
        return True
    try:
        position = _inplace_position(node.target)
    except TypeError:  # an unhashable target
        return False
    return position is not None and len(node.args) > position and node.args[position] is True


def written_arg(node: Node) -> tuple[tuple, Node] | None:
    """(position in the node's args as `flat_args` names it, node) of what an in-place op writes
    (the first written node for an op that writes several: `torch._foreach_mul_`'s list, a tuple
    passed as `out=`), or None for a pure op: a write its name, flags or schema declare
    (`declared_write`), else one it hides inside (`_observed_write`)."""
    return declared_write(node) or _observed_write(node)


def declared_write(node: Node) -> tuple[tuple, Node] | None:
    """`written_arg` by the op's name (`add_`), `inplace=True`, `out=` or aten schema annotation."""
    first = first_node(("args", 0), node.args[0]) if node.args else None
    if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
        return first
    if node.op != "call_function":
        return None
    if isinstance(node.target, torch._ops.OpOverload):  # the schema says which arguments it writes
        for i, arg in enumerate(node.target._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                path = ("args", i) if i < len(node.args) else ("kwargs", arg.name)
                value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                many = isinstance(value, (list, tuple))
                items = [((*path, j), item) for j, item in enumerate(value)] if many else [(path, value)]
                for item_path, item in items:
                    if isinstance(item, Node):
                        return item_path, item
        return None
    if node.target in _INPLACE_FUNCTIONS or _inplace_flag(node):
        return first
    name = getattr(node.target, "__name__", "")
    is_operator = node.target in vars(operator).values()  # operator.and_ etc. are pure
    if not is_operator and name.endswith("_") and not name.endswith("__") and first is not None:
        return first
    return first_node(("kwargs", "out"), node.kwargs.get("out"))


class _NotProbed(Exception):
    """The node cannot run on its traced values (an argument without one, or a real tensor)."""


# graph -> {a call's `_signature`: the position of the first argument a probe saw it write, or None}
_observed: weakref.WeakKeyDictionary[Graph, dict[tuple, tuple | None]] = weakref.WeakKeyDictionary()


def _signature(node: Node) -> tuple:
    """What decides which arguments a call writes: its target and arguments, nodes by their traced `_meta`."""
    leaves = tuple((path, value_signature(v) if isinstance(v, Node) else freeze(v)) for path, v in flat_args(node))
    return node.op, node.target, leaves


def _observed_write(node: Node) -> tuple[tuple, Node] | None:
    """`written_arg` for a torch op that writes an argument without declaring it, such as F.batch_norm
    updating its running statistics (the aten schema of batch_norm has no write annotation): the node
    runs once on copies of its traced fake arguments, resolved to the aten ops it dispatches to, whose
    schemas say what they write. Only torch ops with tensor arguments run (no user code, no global state
    setter); one that cannot run on its traced values counts as pure."""
    torch_op = node.op == "call_method" or (
        node.op == "call_function" and (getattr(node.target, "__module__", None) or "").startswith("torch")
    )
    if not torch_op:
        return None
    seen = _observed.setdefault(node.graph, {})
    try:
        key = _signature(node)
        path = seen[key] if key in seen else seen.setdefault(key, _probe_write(node))
    except TypeError:  # an unhashable argument: probe without the cache
        path = _probe_write(node)
    value = dict(flat_args(node)).get(path) if path is not None else None
    return (path, value) if isinstance(value, Node) else None


class _WriteRecorder(TorchDispatchMode):
    """Records the storages of the tensors each aten op run under it writes, as its schema declares."""

    def __init__(self) -> None:
        super().__init__()
        self.written: set[StorageWeakRef] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                for leaf in pytree.tree_leaves(value):
                    if isinstance(leaf, torch.Tensor):
                        self.written.add(StorageWeakRef(leaf.untyped_storage()))
        return func(*args, **kwargs)


def _probe_write(node: Node) -> tuple | None:
    """The position of the first argument whose fake copy the node writes when run once under the
    python dispatcher, which resolves composite ops to the aten ops that declare their writes."""
    copies: list[tuple[tuple, torch.Tensor]] = []
    modes = set()

    def fake_copy(path: tuple, value: Any) -> Any:
        if not isinstance(value, Node):
            return value
        traced = example_value(value)
        if traced is None:
            raise _NotProbed

        def copy(tensor: torch.Tensor) -> torch.Tensor:
            if not isinstance(tensor, FakeTensor):
                raise _NotProbed
            modes.add(tensor.fake_mode)
            copies.append((path, tensor.clone()))
            return copies[-1][1]

        return pytree.tree_map_only(torch.Tensor, copy, traced)

    recorder = _WriteRecorder()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            args, kwargs = map_args(node, fake_copy)
            if len(modes) != 1:
                raise _NotProbed
            (mode,) = modes
            stack.enter_context(mode)
            if mode.shape_env is not None:  # no guards, no new symbols in the graph's shape environment
                stack.enter_context(mode.shape_env.suppress_guards())
                stack.enter_context(mode.shape_env.ignore_fresh_unbacked_symbols())
            stack.enter_context(enable_python_dispatcher())
            stack.enter_context(recorder)
            if node.op == "call_method":
                getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                node.target(*args, **kwargs)
    except Exception:  # _NotProbed, or an op whose fake kernel cannot run this way
        return None
    return next((path for path, copy in copies if StorageWeakRef(copy.untyped_storage()) in recorder.written), None)


def mutated_arg(node: Node) -> Node | None:
    """The node an in-place op writes to, or None for a pure op."""
    written = written_arg(node)
    return None if written is None else written[1]


def _storages(node: Node) -> set[StorageWeakRef] | None:
    """The storages of the tensors a node's traced value holds; None when the node has no traced value."""
    if "example_value" not in node.meta and "val" not in node.meta:
        return None
    value = example_value(node)
    values = value if isinstance(value, (list, tuple)) else [value]
    return {StorageWeakRef(v.untyped_storage()) for v in values if isinstance(v, torch.Tensor)}


def _aliased_args(node: Node) -> list[Node]:
    """The arguments whose memory the node's value shares (views, in-place ops, `x.to(x.dtype)`), by
    the storages of the traced values; every argument where either has no traced value."""
    mine = _storages(node)
    return [a for a in node.all_input_nodes if mine is None or (theirs := _storages(a)) is None or mine & theirs]


def alias_roots(node: Node, within: set[Node]) -> set[Node]:
    """Where the memory of `node`'s value comes from: walking back through `_aliased_args` inside
    `within`, the nodes of `within` that allocate their value (share memory with no argument) and the
    nodes outside `within` the walk reaches (a layer's state or inputs, graph inputs)."""
    roots, seen, todo = set(), set(), [node]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        parents = _aliased_args(current) if current in within else []
        if parents:
            todo.extend(parents)
        else:
            roots.add(current)
    return roots


def written_roots(nodes: list[Node] | set[Node], within: set[Node]) -> set[Node]:
    """The `alias_roots` (inside `within`) of every tensor the in-place ops among `nodes` write."""
    return {root for n in nodes if (target := mutated_arg(n)) is not None for root in alias_roots(target, within)}


# in-place ops that replace what they write with their value argument (no read of what they overwrite):
# aten name -> positions of the arguments that choose where (index, mask), with their keyword names
_OVERWRITE_PLACES: dict[str, tuple[int, ...]] = {
    "copy": (),
    "fill": (),
    "zero": (),
    "index_copy": (2,),
    "index_fill": (2,),
    "index_put": (1,),
    "masked_fill": (1,),
    "masked_scatter": (1,),
    "scatter": (2,),
    "setitem": (1,),
    "cache_write": (2,),
}
_PLACE_KEYWORDS = ("index", "indices", "mask")


def overwrite_places(node: Node) -> list[Node] | None:
    """For an in-place op that overwrites what it writes with a function of its value argument
    (index_copy_, copy_, setitem, masked_fill_, ...; applied twice with the same arguments, it leaves
    what it left once): the nodes that choose where it writes (index, mask; [] for a whole-tensor
    write). None for any other op, and for one that combines with what it writes (add_, a scatter
    with a reduction, index_put_ with accumulate)."""
    name = aten_name(node)
    if name not in _OVERWRITE_PLACES or node.kwargs.get("reduce") is not None:
        return None
    accumulate = node.kwargs.get("accumulate", node.args[3] if name == "index_put" and len(node.args) > 3 else False)
    if accumulate:
        return None
    chosen = [node.args[i] for i in _OVERWRITE_PLACES[name] if i < len(node.args)]
    chosen += [node.kwargs[k] for k in _PLACE_KEYWORDS if k in node.kwargs]
    return [n for _, n in leaves(chosen, ()) if isinstance(n, Node)]
