"""Find the layer stack of a dynamo FX graph.

Invariants of a returned `LayerStackMatch` (anything else raises `NotAStack` with the reason):

- Layers are consecutive entries of one indexed module container (`blocks.3`, `blocks[3]`,
  `_modules['3']` spellings), in graph order; glue the parent's loop applies between two layers
  (nanochat's x0 mixing) belongs to the layer after it.
- Each layer is a function of exactly one stack value, its state: `layers[l].state_out` feeds
  only layer l+1, and every other input of a layer is computed without the stack (parameters,
  constants, side inputs such as x0, rotary tables, masks). State in and out have equal
  shape and dtype.
- `Layer.nodes` holds only nodes that depend on the state; nodes of a layer that do not
  (lambda lookups, mixing matrices, masks) stay in the graph and become the layer's inputs.
- Layers with equal `key` have identical structure and input shapes: they can be evaluated
  together with their per-layer inputs stacked on a leading axis.
- In-place ops inside a layer write per-layer inputs (a KV cache slice) or tensors the layer
  allocates itself (`alias_roots`), never the state (or a view of it) or an input shared by
  several layers. A tensor the layer allocates and writes is in `Layer.nodes`, with what reads
  it: every evaluation of the layer allocates its own.
- No layer draws random numbers from its state (dropout in training mode, `randn_like`): each
  Newton iteration would draw new ones, so no iteration count would reproduce the model.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import operator
import re
import weakref
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx import Graph, GraphModule, Node
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

_INDEXED = re.compile(r"^(.*)\.(\d+)$")

# A use of a node: (user node, position of the argument in the user's flattened args/kwargs).
Use = tuple[Node, tuple]


# What dynamo records of a context manager that sets global state for the ops traced inside it
# (torch.no_grad, torch.autocast, ...): the call that sets the state -> the state it sets.
_GLOBAL_STATE_CALLS = {
    "torch._C._set_grad_enabled": "grad mode",
    "torch.amp.autocast_mode._enter_autocast": "autocast state",
    "torch.amp.autocast_mode._exit_autocast": "autocast state",
    "torch.autograd.grad_mode._enter_inference_mode": "inference mode",
    "torch.autograd.grad_mode._exit_inference_mode": "inference mode",
    "torch._C._set_fwd_grad_enabled": "forward-AD state",
    "torch._functorch.predispatch._enter_dual_level": "forward-AD state",
    "torch._functorch.predispatch._exit_dual_level": "forward-AD state",
    "torch.nn.attention._sdpa_kernel": "SDPA backend",
}


def _resolve(path: str) -> Any:
    """The object a dotted path names, or None where this torch version lacks it."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


_GLOBAL_STATE: dict[Any, str] = {
    call: state for path, state in _GLOBAL_STATE_CALLS.items() if (call := _resolve(path)) is not None
}


class NotAStack(Exception):
    """The graph holds no layer stack the rewrite can prove safe; the message says why."""


@dataclass
class Layer:
    """One layer of the stack, as a function of its state."""

    module_index: int
    nodes: list[Node]
    state_in: Node
    state_out: Node
    state_uses: set[Use]
    inputs: list[Node] = field(default_factory=list)
    key: tuple = ()


@dataclass
class LayerStackMatch:
    container: str
    layers: list[Layer]
    groups: list[list[int]]
    excluded: list[int]

    def describe(self) -> str:
        first, last = self.layers[0].module_index, self.layers[-1].module_index
        sizes = "+".join(str(len(g)) for g in self.groups)
        groups = f"{len(self.groups)} fusion group(s) ({sizes})"
        return f"{len(self.layers)} layers of {self.container}[{first}..{last}] in {groups}"


def _normalise(path: str) -> str:
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    return re.sub(r"\[(\d+)\]", r".\1", path)


def layer_key(node: Node) -> tuple[str, int] | None:
    """(container path, index) of the outermost indexed module the node was traced in."""
    for entry in (node.meta.get("nn_module_stack") or {}).values():
        path = entry[0] if isinstance(entry, tuple) else str(entry)
        match = _INDEXED.match(_normalise(path))
        if match:
            return match.group(1), int(match.group(2))
    return None


def flat_args(node: Node) -> Iterator[tuple[tuple, Any]]:
    """Leaves of a node's args and kwargs with their positions."""

    def walk(value: Any, path: tuple) -> Iterator[tuple[tuple, Any]]:
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                yield from walk(item, (*path, i))
        elif isinstance(value, dict):
            for k, item in value.items():
                yield from walk(item, (*path, k))
        else:
            yield path, value

    yield from walk(node.args, ("args",))
    yield from walk(node.kwargs, ("kwargs",))


def map_args(node: Node, fn) -> tuple[tuple, dict]:
    """Rebuild a node's (args, kwargs) with every leaf replaced by fn(position, leaf)."""

    def walk(value: Any, path: tuple) -> Any:
        if isinstance(value, (list, tuple)):
            return type(value)(walk(item, (*path, i)) for i, item in enumerate(value))
        if isinstance(value, dict):
            return {k: walk(item, (*path, k)) for k, item in value.items()}
        return fn(path, value)

    return walk(node.args, ("args",)), walk(node.kwargs, ("kwargs",))


_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


def specialised(value: Any) -> Any:
    """A symbolic scalar as the Python number the shape environment has pinned it to (a size guarded
    equal to 32, an unspecialised float dynamo had to specialise), else `value` itself; no guard is added."""
    if not isinstance(value, _SYMBOLIC):
        return value
    sym = value.node
    known = sym.maybe_as_int() if sym.is_int() else sym.maybe_as_float() if sym.is_float() else sym.maybe_as_bool()
    return value if known is None else known


def _freeze(value: Any) -> Any:
    """A hashable form of an argument or traced value; equal symbolic and concrete scalars freeze equal."""
    if isinstance(value, slice):
        return ("slice", _freeze(value.start), _freeze(value.stop), _freeze(value.step))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    value = specialised(value)
    if isinstance(value, _SYMBOLIC):
        return ("sym", str(value))
    return value


def example_value(node: Node) -> Any:
    """The traced value of a node: dynamo's "example_value" or export's "val"."""
    return node.meta.get("example_value", node.meta.get("val"))


def _meta(node: Node) -> tuple:
    """What a layer's key holds of a traced value: a tensor's shape, dtype and device; a scalar's value
    (a per-layer scalar can only be shared by layers it is equal in, never stacked); else its type."""
    value = example_value(node)
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(_freeze(list(value.shape))), value.dtype, value.device.type)
    if isinstance(value, (int, float, *_SYMBOLIC)):
        return ("scalar", _freeze(value))
    return ("value", type(value).__name__)


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


def _first_node(path: tuple, value: Any) -> tuple[tuple, Node] | None:
    """(path, node) of `value` if it is a node, else of the first node in it if it is a list or tuple."""
    if isinstance(value, (list, tuple)):
        return next((((*path, j), item) for j, item in enumerate(value) if isinstance(item, Node)), None)
    return (path, value) if isinstance(value, Node) else None


def written_arg(node: Node) -> tuple[tuple, Node] | None:
    """(position in the node's args as `flat_args` names it, node) of what an in-place op writes
    (the first written node for an op that writes several: `torch._foreach_mul_`'s list, a tuple
    passed as `out=`), or None for a pure op: a write its name, flags or schema declare
    (`_declared_write`), else one it hides inside (`_observed_write`)."""
    return _declared_write(node) or _observed_write(node)


def _declared_write(node: Node) -> tuple[tuple, Node] | None:
    """`written_arg` by the op's name (`add_`), `inplace=True`, `out=` or aten schema annotation."""
    first = _first_node(("args", 0), node.args[0]) if node.args else None
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
    return _first_node(("kwargs", "out"), node.kwargs.get("out"))


class _NotProbed(Exception):
    """The node cannot run on its traced values (an argument without one, or a real tensor)."""


# graph -> {a call's `_signature`: the position of the first argument a probe saw it write, or None}
_observed: weakref.WeakKeyDictionary[Graph, dict[tuple, tuple | None]] = weakref.WeakKeyDictionary()


def _signature(node: Node) -> tuple:
    """What decides which arguments a call writes: its target and arguments, nodes by their traced `_meta`."""
    leaves = tuple((path, _meta(v) if isinstance(v, Node) else _freeze(v)) for path, v in flat_args(node))
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


def _aten_name(node: Node) -> str | None:
    """The name of the aten op a node calls (`dropout`, `bernoulli` for `bernoulli_`), if any."""
    if node.op == "call_method" and isinstance(node.target, str):
        return node.target.rstrip("_") or None
    if node.op != "call_function":
        return None
    schema = getattr(node.target, "_schema", None)
    name = schema.name.split("::")[-1] if schema is not None else getattr(node.target, "__name__", None)
    return name.rstrip("_") if isinstance(name, str) else None


def _bound_arguments(node: Node, packet: torch._ops.OpOverloadPacket) -> dict[str, Any]:
    """A call_function node's arguments by name, defaults filled in: by the aten schema of an aten
    target, by the Python signature of a Python one, else by the packet's schema (builtins such as
    torch's SDPA have no Python signature; their arguments follow the aten op's)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        try:
            parameters = inspect.signature(node.target).parameters
        except (TypeError, ValueError):
            schema = getattr(packet, packet.overloads()[0])._schema
        else:
            defaults = {k: p.default for k, p in parameters.items() if p.default is not inspect.Parameter.empty}
            return {**defaults, **dict(zip(parameters, node.args, strict=False)), **node.kwargs}
    defaults = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    return {**defaults, **dict(zip([a.name for a in schema.arguments], node.args, strict=False)), **node.kwargs}


def random_op(node: Node) -> str | None:
    """The name of the random op `node` calls (an aten op tagged nondeterministic_seeded, by its own
    or its aten name: F.dropout, torch.randn_like, Tensor.bernoulli_), None for a deterministic one:
    a dropout-like op called with training=False or with probability 0 (`p`, SDPA's `dropout_p`),
    which returns its input and draws nothing."""
    name = _aten_name(node)
    packet = getattr(torch.ops.aten, name, None) if name else None
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return None
    tags = {tag for overload in packet.overloads() for tag in getattr(packet, overload).tags}
    if torch.Tag.nondeterministic_seeded not in tags:
        return None
    bound = _bound_arguments(node, packet) if node.op == "call_function" else {}
    flag = next((bound[k] for k in ("training", "train") if k in bound), None)
    probability = next((bound[k] for k in ("p", "dropout_p") if k in bound), None)
    probability = specialised(example_value(probability) if isinstance(probability, Node) else probability)
    if flag is False or (isinstance(probability, (int, float)) and probability == 0):
        return None
    return name


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


def _forward_closure(starts: set[Node], within: set[Node] | None = None) -> set[Node]:
    seen, todo = set(), list(starts)
    while todo:
        for user in todo.pop().users:
            if user not in seen and (within is None or user in within):
                seen.add(user)
                todo.append(user)
    return seen


def backward_closure(starts: set[Node], within: set[Node] | None = None) -> set[Node]:
    """The nodes `starts` are computed from (not `starts` themselves), within `within` if given."""
    seen, todo = set(), list(starts)
    while todo:
        for arg in todo.pop().all_input_nodes:
            if arg not in seen and (within is None or arg in within):
                seen.add(arg)
                todo.append(arg)
    return seen


def _canonical(nodes: list[Node], state_uses: set[Use]) -> tuple[tuple, list[Node]]:
    """Structure of `nodes` (graph order) with state uses, internal refs and external slots
    abstracted; returns (key, external inputs in first-use order)."""
    index = {n: i for i, n in enumerate(nodes)}
    slots: dict[Node, int] = {}
    items = []
    for n in nodes:
        args = []
        for path, value in flat_args(n):
            if isinstance(value, Node):
                if (n, path) in state_uses:
                    ref = ("state",)
                elif value in index:
                    ref = ("node", index[value])
                else:
                    ref = ("input", slots.setdefault(value, len(slots)))
            else:
                ref = ("const", _freeze(value))
            args.append((path, ref))
        target = n.target if n.op != "call_module" else ("module", str(n.target))
        items.append((n.op, target, tuple(args)))
    inputs = list(slots)
    return (tuple(items), tuple(_meta(i) for i in inputs)), inputs


def _uses_of(node: Node, users: set[Node]) -> set[Use]:
    return {(u, p) for u in users for p, v in flat_args(u) if v is node}


def _match_glue(pattern: Node, candidate: Node, glue: set[Node], state: Node, found: dict) -> bool:
    """Backward structural match of a glue node of a later layer onto layer 0's graph."""
    if pattern is state:
        found.setdefault("state", candidate)
        return found["state"] is candidate
    if pattern not in glue:
        return True
    if (
        candidate.op != pattern.op
        or candidate.target != pattern.target
        or layer_key(candidate) is not None
        or candidate.op == "placeholder"
    ):
        return False
    p_args, c_args = list(flat_args(pattern)), list(flat_args(candidate))
    if [p for p, _ in p_args] != [p for p, _ in c_args]:
        return False
    found.setdefault("glue", set()).add(candidate)
    for (path, p), (_, c) in zip(p_args, c_args, strict=True):
        if isinstance(p, Node) != isinstance(c, Node):
            return False
        if isinstance(p, Node):
            if p is state and pattern in glue:
                found.setdefault("state_uses", set()).add((candidate, path))
            if not _match_glue(p, c, glue, state, found):
                return False
        elif _freeze(p) != _freeze(c):
            return False
    return True


def detect_layer_stack(gm: GraphModule) -> LayerStackMatch:
    """Find the layer stack of `gm` or raise NotAStack with the reason."""
    graph_nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(graph_nodes)}
    keyed: dict[tuple[str, int], list[Node]] = defaultdict(list)
    for n in graph_nodes:
        if n.op in ("call_function", "call_method", "call_module"):
            key = layer_key(n)
            if key is not None:
                keyed[key].append(n)
    if not keyed:
        raise NotAStack("no node was traced inside an indexed module container (nn.ModuleList / nn.Sequential)")
    counts = Counter(container for container, _ in keyed)
    container, count = counts.most_common(1)[0]
    if count < 2:
        raise NotAStack(f"only one layer of {container} is in this graph")
    indices = sorted(i for c, i in keyed if c == container)
    if indices != list(range(indices[0], indices[0] + len(indices))):
        raise NotAStack(f"the layers of {container} in this graph are not consecutive: {indices}")
    regions = [set(keyed[(container, i)]) for i in indices]

    outs = []
    for i, region in zip(indices, regions, strict=True):
        leaving = [n for n in region if any(u not in region for u in n.users)]
        if len(leaving) != 1:
            names = ", ".join(n.name for n in leaving) or "nothing"
            raise NotAStack(
                f"layer {container}.{i} passes {len(leaving)} values on ({names}); a stack layer passes one"
            )
        outs.append(leaving[0])

    non_keyed = {n for n in graph_nodes if layer_key(n) is None and n.op != "placeholder"}
    layers: list[Layer | None] = [None] * len(indices)
    for pos in range(1, len(indices)):
        prev_out, region = outs[pos - 1], regions[pos]
        between = _forward_closure({prev_out}, non_keyed)
        glue = backward_closure(region, between)
        full = glue | region
        stray = [(n, u) for n in (prev_out, *glue) for u in n.users if u not in full]
        if stray:
            state, user = stray[0]
            what = "the state" if state is prev_out else f"{state.name}, computed from the state"
            raise NotAStack(
                f"{what} leaving {container}.{indices[pos - 1]} is also used outside "
                f"{container}.{indices[pos]} (by {user.name}): not a chain"
            )
        layers[pos] = _make_layer(indices[pos], full, prev_out, _uses_of(prev_out, full), outs[pos], position)
    layers[0] = _first_layer(indices[0], regions, outs, layers, position)
    excluded = []
    if layers[0] is None:
        excluded.append(indices[0])
        layers = layers[1:]
    _check_chain(container, layers)
    groups = _group(layers)
    if len(layers) < 2:
        raise NotAStack(f"fewer than two layers of {container} form a chain")
    return LayerStackMatch(container, layers, groups, excluded)


def _make_layer(
    index: int, region: set[Node], state_in: Node, state_uses: set[Use], state_out: Node, position: dict
) -> Layer:
    # A tensor the layer allocates and writes in place is its scratch: allocated in every evaluation
    # of the layer, never hoisted (shared by layers, kept across Newton iterations). Nodes reading a
    # tensor the layer writes in place must run after the write: keep them in.
    written = {mutated_arg(n) for n in region} - {None}
    scratch = written_roots(region, region) & region
    starts = {u for u, _ in state_uses} | scratch | {n for n in region if set(n.all_input_nodes) & written}
    dependent = (starts | _forward_closure(starts, region)) & region
    if state_out not in dependent:
        raise NotAStack(f"the output of layer {index} does not depend on its input")
    nodes = sorted(dependent, key=position.__getitem__)
    key, inputs = _canonical(nodes, state_uses)
    return Layer(index, nodes, state_in, state_out, state_uses, inputs, (key, _meta(state_in)))


def _first_layer(index: int, regions: list, outs: list, layers: list, position: dict) -> Layer | None:
    """Layer 0 has no previous layer to delimit its glue and state: match a later layer of the
    same structure onto it node by node; an argument that is the later layer's state (or its
    glue) marks a state use in layer 0, even where layer 0's state is also a side input (x0)."""
    nodes0 = sorted(regions[0], key=position.__getitem__)
    for pos in range(1, len(regions)):
        later = layers[pos]
        nodes = sorted(regions[pos], key=position.__getitem__)
        if len(nodes) != len(nodes0):
            continue
        glue = set(later.nodes) - regions[pos]
        index_of = {n: i for i, n in enumerate(nodes)}
        found: dict = {"state_uses": set()}
        ok = True
        for p_node, c_node in zip(nodes, nodes0, strict=True):
            p_args, c_args = list(flat_args(p_node)), list(flat_args(c_node))
            if (p_node.op, p_node.target) != (c_node.op, c_node.target) or [a for a, _ in p_args] != [
                a for a, _ in c_args
            ]:
                ok = False
                break
            for (path, p), (_, c) in zip(p_args, c_args, strict=True):
                if not isinstance(p, Node):
                    continue
                if not isinstance(c, Node) or (p in index_of) != (c in regions[0]):
                    ok = False
                elif p in index_of:
                    ok = nodes0[index_of[p]] is c
                elif p is later.state_in:
                    found["state_uses"].add((c_node, path))
                    found.setdefault("state", c)
                    ok = found["state"] is c
                elif p in glue:
                    ok = _match_glue(p, c, glue, later.state_in, found)
                if not ok:
                    break
            if not ok:
                break
        if not ok or "state" not in found:
            continue
        glue0 = found.get("glue", set())
        full = regions[0] | glue0
        if any(u not in full for g in glue0 for u in g.users):
            return None
        try:
            return _make_layer(index, full, found["state"], found["state_uses"], outs[0], position)
        except NotAStack:
            return None
    return None


def _check_one_global_state(container: str, layers: list[Layer]) -> None:
    """Every stack node runs under one global state (grad mode, autocast, ...), the one the rewrite's
    single call of the stack runs under: no region of dynamo's graph begins or ends between the
    stack's first and last node (a region around the whole stack is fine)."""
    stack = {n for layer in layers for n in layer.nodes}
    started, change = False, None
    for node in layers[0].state_out.graph.nodes:
        if node in stack:
            if change is not None:
                first, last = layers[0].module_index, layers[-1].module_index
                raise NotAStack(
                    f"the {_GLOBAL_STATE[change.target]} changes inside the stack {container}[{first}..{last}] "
                    f"(at {change.name}); the rewrite runs the whole stack under one state"
                )
            started = True
        elif started and node.op == "call_function" and node.target in _GLOBAL_STATE:
            change = change or node


def _requires_grad(node: Node) -> bool:
    """Some tensor of the node's traced value requires grad (the graph is differentiated through it)."""
    return any(t.requires_grad for t in pytree.tree_leaves(example_value(node)) if isinstance(t, torch.Tensor))


def _check_gradient_flow(container: str, layers: list[Layer]) -> None:
    """Where the stack is differentiated, a layer whose state requires grad passes that gradient on:
    an op that stops it on every path (`x.detach()` between layers) would be bypassed by the Newton
    corrections, which carry the state's gradient around the layer function; eager gives what lies
    before the stop no gradient at all. (At inference nothing requires grad, and a detach changes nothing.)"""
    if not any(_requires_grad(n) for layer in layers for n in layer.nodes):
        return
    for layer in layers:
        if not _requires_grad(layer.state_in):
            continue
        users = {u for u, _ in layer.state_uses}
        carries, stops = set(), []  # nodes the state's gradient reaches; nodes it stops at
        for node in layer.nodes:
            if node in users or carries.intersection(node.all_input_nodes):
                (carries.add if _requires_grad(node) else stops.append)(node)
        if layer.state_out not in carries:
            stop = stops[0] if stops else layer.state_out
            raise NotAStack(
                f"{stop.name} ({getattr(stop.target, '__name__', stop.target)}) in layer {container}."
                f"{layer.module_index} stops the gradient of the state in a differentiated graph: the Newton "
                "corrections would carry it around the stop"
            )


def _check_chain(container: str, layers: list[Layer]) -> None:
    _check_one_global_state(container, layers)
    _check_gradient_flow(container, layers)
    inside = set().union(*(set(layer.nodes) for layer in layers))
    downstream = _forward_closure(inside) | inside  # what any layer node (glue too) flows into
    for layer in layers:
        own = set(layer.nodes)
        shape_in, shape_out = _meta(layer.state_in), _meta(layer.state_out)
        if shape_in != shape_out:
            raise NotAStack(
                f"layer {container}.{layer.module_index} changes the state from {shape_in[1:]} to {shape_out[1:]}"
            )
        for node in layer.inputs:
            if node in downstream:
                raise NotAStack(
                    f"layer {container}.{layer.module_index} reads {node.name}, which is computed from the stack "
                    "other than through its input: not a chain"
                )
        for node in layer.nodes:
            if (name := random_op(node)) is not None:
                raise NotAStack(
                    f"{node.name} in layer {container}.{layer.module_index} draws random numbers ({name}): each "
                    "Newton iteration would draw new ones, so no iteration count reproduces the model (dropout: "
                    "put the model in eval mode or set its probability to 0)"
                )
            written = written_arg(node)
            if written is None:
                continue
            # a write to a tensor the layer allocates (a root in `own`) is its own; to a per-layer input, rewritten
            path, target = written
            roots = alias_roots(target, own)
            if (node, path) in layer.state_uses or layer.state_in in roots:
                raise NotAStack(f"{node.name} in layer {container}.{layer.module_index} writes its state in place")
            read = next((r for r in roots for other in layers if other is not layer and r in other.inputs), None)
            if read is not None:
                raise NotAStack(
                    f"{node.name} in layer {container}.{layer.module_index} writes {read.name}, which other layers read"
                )


def _group(layers: list[Layer]) -> list[list[int]]:
    groups: dict[tuple, list[int]] = {}
    for pos, layer in enumerate(layers):
        groups.setdefault(layer.key, []).append(pos)
    return list(groups.values())
