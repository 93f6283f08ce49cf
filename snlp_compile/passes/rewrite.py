"""Replace a detected layer stack by one structured-Newton solve.

Invariants of the rewritten graph:

- Every node outside the stack is kept, in its original order, except layer inputs that
  repeat an earlier one's value (each such value is computed once); the stack's state-dependent
  nodes are replaced by one `call_module` to a `StackProgram`, placed where the last layer's
  output was, whose value has the same meta as that output.
- Each fusion group becomes one layer GraphModule `(state, *inputs) -> state`, evaluated for all
  its layers at once under `torch.vmap` with per-layer inputs stacked on a leading axis; where
  vmap cannot batch an attention call itself, it goes through `snlp::attention`, which vmap
  folds into one batched call, and `index_copy_` (KV-cache writes) becomes `index_put_`, which
  vmap batches into one write of the new positions (the built-in models' `snlp::cache_write_`
  has a vmap rule of its own that does the same). With `gemv` (inference), each group also gets
  a graph for calls on one layer at a time (sequential layers, one-layer blocks), whose decode
  attention takes the split-KV kernels of `snlp::decode_attention`.
- A tensor a layer allocates and writes in place (`detect.alias_roots`) goes through
  `snlp::scratch` in the graph run under vmap: a fresh copy per layer and evaluation, which vmap
  can write per-layer values into.
- Per-layer inputs are stacked without a copy where they are views of one tensor
  (`lambdas[i]`, `kv_cache.k[i]`: sliced instead); inference-time parameters become new
  buffers of the graph kept up to date by `StackedWeights`; anything else is stacked inside the
  graph, so gradients reach each layer's own tensors.
- An input a layer writes in place is always a view slice, so writes reach the original tensor.
- Random draws and other impure ops outside the layer graphs are never merged or erased: each
  runs once per call, in the original order.
- The input GraphModule is not modified (the backend compiles it as is when it falls back).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.source import LocalSource
from torch.fx import Graph, GraphModule, Node

from ..config import SNLPConfig
from ..kernels import HALF_DTYPES
from ..kernels import rms_norm as _rms_norm  # noqa: F401  (registers snlp::rms_norm)
from ..kernels import scratch as _scratch  # noqa: F401  (registers snlp::scratch)
from ..kernels.attention import sdpa
from ..kernels.decode_attention import runs_decode_attention
from ..kernels.stacked_linear import bias_free_linear
from ..runtime.stacked_weights import StackedWeights
from ..runtime.traced_vmap import TracedVmap
from ..solver import IDENTITY, Surrogate, solve
from .detect import (
    Layer,
    LayerStackMatch,
    NotAStack,
    backward_closure,
    example_value,
    map_args,
    mutated_arg,
    random_op,
    specialised,
    written_roots,
)
from .rotary import fuse_rotary
from .sibling_linears import fuse_sibling_linears
from .surrogate import SurrogateRecipe, evaluate_recipe
from .twin_chains import fuse_twin_chains

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _sdpa_arguments(node: Node) -> dict[str, Any] | None:
    """The arguments (by name) of an F.scaled_dot_product_attention call without dropout or GQA flag;
    None for any other node."""
    if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
        return None
    bound = {**dict(zip(_SDPA_ARGS, node.args, strict=False)), **node.kwargs}
    return None if bound.get("dropout_p") or bound.get("enable_gqa") else bound


def _traced(value: object) -> object:
    return example_value(value) if isinstance(value, Node) else value


def _needs_batched_attention(node: Node) -> bool:
    """Route an SDPA call through snlp::attention where vmap's own batching falls short: on CPU
    (no batching rule: a loop over layers) and on CUDA with a mask where SDPA picks its efficient
    kernel, which rejects the vmapped mask: batch > 1, or a float32 query at any batch. Elsewhere
    (16-bit, batch 1) vmap's rule is kept: it lets inductor see SDPA."""
    args = _sdpa_arguments(node)
    if args is None:
        return False
    query = _traced(args.get("query"))
    if not isinstance(query, Tensor) or query.device.type != "cuda":
        return True
    half = query.dtype in HALF_DTYPES
    return args.get("attn_mask") is not None and query.dim() > 3 and (query.shape[0] != 1 or not half)


def _decode_attention(node: Node) -> bool:
    """An SDPA call that snlp::decode_attention's split-KV kernels serve (`runs_decode_attention`)."""
    args = _sdpa_arguments(node)
    if args is None:
        return False
    q, k, v, mask = (_traced(args.get(name)) for name in _SDPA_ARGS[:4])
    if not all(isinstance(t, Tensor) for t in (q, k, v)) or not (mask is None or isinstance(mask, Tensor)):
        return False
    return runs_decode_attention(q, k, v, mask, bool(args.get("is_causal", False)))


def index_copy_(target: Tensor, dim: int, index: Tensor, source: Tensor) -> Tensor:
    """`target.index_copy_(dim, index, source)` as `aten.index_put_`, which vmap batches into one write of
    the new positions of every layer (vmap has no rule for index_copy_: it loops over the layers, and
    functionalisation turns that loop into whole-cache copies).

    An index shared by the layers writes through `index_put_` on `target` itself (inductor turns it
    into an in-place scatter of the new positions); a per-layer (vmap-batched) index needs the dim-0
    form, which vmap's rule handles correctly (its rule for a leading None index writes wrong slots).
    """
    dim = dim % target.dim()
    if dim == 0 or not torch._C._functorch.is_batchedtensor(index):
        torch.ops.aten.index_put_(target, [None] * dim + [index], source)
    else:
        target.movedim(dim, 0).index_put_((index,), source.movedim(dim, 0))  # a view: writes reach target
    return target


def _scratch_nodes(layer: Layer) -> set[Node]:
    """The tensors the layer allocates and writes in place (the layer's own `written_roots`); of an op that
    allocates several (`torch.sort`), the items read from it."""
    own = set(layer.nodes)
    roots = written_roots(layer.nodes, own) & own
    items = {u for r in roots for u in r.users if u in own and u.target is operator.getitem}
    return {n for n in roots | items if isinstance(example_value(n), Tensor)}


_INDEX_COPY_ = (torch.Tensor.index_copy_, torch.ops.aten.index_copy_, torch.ops.aten.index_copy_.default)
_LINEAR = (F.linear, torch._C._nn.linear, torch.ops.aten.linear, torch.ops.aten.linear.default)


def is_bias_free_linear(node: Node) -> bool:
    """A linear with no bias and a 2-D weight (what snlp::linear computes)."""
    if node.op != "call_function" or node.target not in _LINEAR or len(node.args) < 2:
        return False
    bias = node.kwargs.get("bias", node.args[2] if len(node.args) > 2 else None)
    weight = example_value(node.args[1]) if isinstance(node.args[1], Node) else None
    return bias is None and isinstance(weight, Tensor) and weight.dim() == 2


def linear_by_einsum(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear as an einsum. Under vmap, torch 2.11's matmul batching rule calls numel() on a tensor
    with symbolic sizes, which fails while inductor traces a graph of symbolic sequence length;
    einsum's batching does not."""
    out = torch.einsum("...i,oi->...o", input, weight)
    return out if bias is None else out + bias


def _symbolic_linear(node: Node) -> bool:
    """A linear whose input has a symbolic size (dynamic=True, or dynamo's automatic dynamic shapes)."""
    if node.op != "call_function" or node.target not in _LINEAR or not node.args:
        return False
    value = _traced(node.args[0])
    return isinstance(value, Tensor) and any(isinstance(s, torch.SymInt) for s in value.shape)


_RMS_NORM = (torch.rms_norm, F.rms_norm)


def _batchable_target(
    node: Node, gemv: bool, one_layer: bool, fused_kernels: bool
) -> tuple[str, object, dict[str, Any]]:
    """(op, target, extra kwargs) that evaluates `node` with good batching under vmap: SDPA through snlp::attention
    where needed (`_needs_batched_attention`), index_copy_ as index_put_, with `gemv` bias-free
    linears through snlp::linear and, in a graph for one-layer calls, decode attention through
    snlp::decode_attention (split-KV kernels; a stacked call's SDPA already fills the GPU), with
    `fused_kernels`, in a graph run under vmap, RMS norms through snlp::rms_norm (one fused kernel,
    not its decomposition; a one-layer call keeps torch's, which dispatches faster than a custom
    op), linears of symbolic size under vmap as einsums (`linear_by_einsum`); otherwise the node's own."""
    if fused_kernels and not one_layer and node.op == "call_function" and node.target in _RMS_NORM:
        return "call_function", torch.ops.snlp.rms_norm.default, {}
    if gemv and is_bias_free_linear(node):
        return "call_function", bias_free_linear, {}
    if gemv and one_layer and _decode_attention(node):
        return "call_function", sdpa, {"decode": True}
    if not one_layer and _symbolic_linear(node):
        return "call_function", linear_by_einsum, {}
    if _needs_batched_attention(node):
        return "call_function", sdpa, {}
    if (node.op, node.target) == ("call_method", "index_copy_") or (
        node.op == "call_function" and node.target in _INDEX_COPY_
    ):
        return "call_function", index_copy_, {}
    return node.op, node.target, {}


def layer_module(
    root: GraphModule,
    layer: Layer,
    gemv: bool = False,
    one_layer: bool = False,
    fused_kernels: bool = False,
    eager: bool = False,
    aliases: list[int] | None = None,
) -> GraphModule:
    """The layer as a standalone GraphModule (state, *layer.inputs) -> state; `gemv`: decode kernels
    (inference only: they have no autograd formula): bias-free linears through snlp::linear,
    siblings of one input in one call, and with `one_layer` (a graph called for one layer at a
    time, not under vmap) decode attention through the split-KV kernels; `fused_kernels` (inference,
    eager inner compiler): rotary embeddings through snlp::rotary after twin chains (`fuse_rotary`)
    and, under vmap, RMS norms through snlp::rms_norm; `eager` (a graph run eagerly): twin chains
    as one (`fuse_twin_chains`). `aliases[k]`: the input slot whose
    placeholder the graph reads for input k (one that always holds the same value, `_input_aliases`).
    Unless `one_layer`, the layer's scratch tensors (`_scratch_nodes`) go through `snlp::scratch`."""
    graph = Graph()
    state = graph.placeholder("state")
    inputs = [graph.placeholder(f"input_{k}") for k in range(len(layer.inputs))]
    for placeholder, node in zip((state, *inputs), (layer.state_in, *layer.inputs), strict=True):
        placeholder.meta = dict(node.meta)  # the traced values, which passes on the layer graph read
    aliases = aliases or list(range(len(inputs)))
    slot = {node: inputs[aliases[k]] for k, node in enumerate(layer.inputs)}
    env: dict[Node, Node] = {}
    own_copies = set() if one_layer else _scratch_nodes(layer)
    for node in layer.nodes:

        def remap(path: tuple, value: object, node: Node = node) -> object:
            if not isinstance(value, Node):
                return value
            if (node, path) in layer.state_uses:
                return state
            return env[value] if value in env else slot[value]

        args, kwargs = map_args(node, remap)
        op, target, extra = _batchable_target(node, gemv, one_layer, fused_kernels)
        env[node] = graph.create_node(op, target, args, {**kwargs, **extra}, name=node.name)
        env[node].meta = dict(node.meta)
        if node in own_copies:
            env[node] = graph.call_function(torch.ops.snlp.scratch.default, (env[node], state))
            env[node].meta = dict(node.meta)
    graph.output(env[layer.state_out])
    if gemv:
        fuse_sibling_linears(graph)
    if eager:
        fuse_twin_chains(graph)
    if fused_kernels:
        fuse_rotary(graph)
    return GraphModule(root, graph)


class GraphStack:
    """The solver's view (`solver.LayerStack`) of a rewritten stack for one call. `per_layer` holds
    the inputs of the layers `solve` runs one at a time (the n_seq sequential ones), `per_group`
    those of each fusion group (stacked where they differ between members)."""

    def __init__(self, program: StackProgram, per_layer: tuple, per_group: tuple):
        self.program, self.per_layer, self.per_group = program, per_layer, per_group
        self.surrogate = program.surrogate(per_group)

    def __len__(self) -> int:
        return len(self.program.group_of)

    def layer(self, index: int, h: Tensor) -> Tensor:
        if index >= len(self.per_layer):
            raise IndexError(f"GraphStack.layer: only the {len(self.per_layer)} sequential layers run one at a time")
        return self.program.one_layer_function(self.program.group_of[index])(h, *self.per_layer[index])

    def layers(self, start: int, hs: Tensor) -> Tensor:
        end = start + hs.shape[0]
        parts = []
        for g, members in enumerate(self.program.groups):
            inside = [i for i, p in enumerate(members) if start <= p < end]
            if not inside:
                continue
            a, b = inside[0], inside[-1] + 1
            local = [members[i] - start for i in range(a, b)]
            xs = hs if local == list(range(hs.shape[0])) else hs[torch.tensor(local, device=hs.device)]
            batched = self.program.batched[g]
            if b - a == 1:  # one layer: called as is (vmap could not write its unbatched in-place inputs)
                args = [x[a] if stacked else x for x, stacked in zip(self.per_group[g], batched, strict=True)]
                parts.append((local, self.program.one_layer_function(g)(xs[0], *args).unsqueeze(0)))
                continue
            args = [x[a:b] if stacked else x for x, stacked in zip(self.per_group[g], batched, strict=True)]
            parts.append((local, self.program.vmapped[g](xs, *args)))
        if len(parts) == 1:
            return parts[0][1]
        out = torch.empty_like(hs)
        for local, ys in parts:
            out = out.index_copy(0, torch.tensor(local, device=hs.device), ys)
        return out


class StackProgram(nn.Module):
    """Runs the SNLP solve over the layer functions of a rewritten stack."""

    def __init__(
        self,
        functions: list[GraphModule],
        one_layer_functions: list[GraphModule] | None,
        groups: list[list[int]],
        batched: list[list[bool]],
        recipes: list[SurrogateRecipe],
        config: SNLPConfig,
    ):
        super().__init__()
        self.functions = nn.ModuleList(functions)  # called under vmap for several layers at once
        # for one layer at a time (sequential layers, one-layer blocks) where those take other kernels
        self.one_layer_functions = None if one_layer_functions is None else nn.ModuleList(one_layer_functions)
        self.groups, self.batched, self.recipes, self.config = groups, batched, recipes, config
        # all layers of a group at once; replayed from a trace when the graph runs eagerly
        self.vmapped = [
            TracedVmap(f, (0, *[0 if on else None for on in bs])) for f, bs in zip(functions, batched, strict=True)
        ]
        self.group_of = [0] * sum(len(g) for g in groups)
        for g, members in enumerate(groups):
            for p in members:
                self.group_of[p] = g

    def one_layer_function(self, group: int) -> nn.Module:
        """The layer function of `group` for a call on one layer (not under vmap)."""
        return (self.one_layer_functions or self.functions)[group]

    def surrogate(self, per_group: tuple) -> Surrogate:
        """Per-layer J in stack order, evaluated once per call from the group inputs."""
        values = [
            evaluate_recipe(r, list(inputs), len(m))
            for r, inputs, m in zip(self.recipes, per_group, self.groups, strict=True)
        ]
        kinds = {r.kind for r in self.recipes}
        if kinds == {"identity"}:
            return IDENTITY
        kind = "mix" if "mix" in kinds else "scale"
        if kind == "mix":
            size = next(v.shape[-1] for v, r in zip(values, self.recipes, strict=True) if r.kind == "mix")
            ref = next(v for v in values if v is not None)
            eye = torch.eye(size, dtype=ref.dtype, device=ref.device)
            values = [
                eye.expand(len(m), size, size) if v is None else (v[:, None, None] * eye if v.dim() == 1 else v)
                for v, m in zip(values, self.groups, strict=True)
            ]
        else:
            ref = next(v for v in values if v is not None)
            values = [
                torch.ones(len(m), dtype=ref.dtype, device=ref.device) if v is None else v
                for v, m in zip(values, self.groups, strict=True)
            ]
        order = [p for m in self.groups for p in m]
        stacked = torch.cat(values)
        if order != list(range(len(order))):
            index = torch.tensor(order, device=stacked.device)
            stacked = torch.empty_like(stacked).index_copy(0, index, stacked)
        return Surrogate(kind, stacked)

    def forward(self, state: Tensor, per_layer: tuple, per_group: tuple) -> Tensor:
        return solve(GraphStack(self, per_layer, per_group), state, self.config)


def _pure(node: Node) -> bool:
    """A call whose value is a function of its arguments alone, with no effect: it writes nothing in
    place, draws no random numbers and has no side effect."""
    calls = node.op in ("call_function", "call_method")
    return calls and mutated_arg(node) is None and random_op(node) is None and not node.is_impure()


def same_value(a: object, b: object) -> bool:
    """a and b compute the same value: the same node, or the same `_pure` op on the same values (two
    random draws never do)."""
    if a is b:
        return True
    if not isinstance(a, Node) or not isinstance(b, Node):
        return type(a) is type(b) and not isinstance(a, Node) and a == b
    if (a.op, a.target) != (b.op, b.target) or not _pure(a):
        return False
    if len(a.args) != len(b.args) or a.kwargs.keys() != b.kwargs.keys():
        return False
    pairs = [*zip(a.args, b.args, strict=True), *((a.kwargs[k], b.kwargs[k]) for k in a.kwargs)]
    return all(same_value(x, y) for x, y in pairs)


def _roots(node: Node) -> set[Node]:
    """The graph inputs (placeholders, get_attrs) whose values `node` is computed from."""
    return {n for n in backward_closure({node}) | {node} if n.op in ("placeholder", "get_attr")}


def _canonical_inputs(graph: Graph, layers: list[Layer]) -> dict[Node, Node]:
    """Each layer input -> the first layer input that computes the same value (`same_value`) with no
    in-place write to what it is computed from in between (e.g. every layer's rotary tables cast to
    its dtype -> layer 0's): the rewritten graph computes each such value once, where an eager inner
    compiler would run every copy on every call."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    writes = [(order[n], _roots(n)) for n in graph.nodes if mutated_arg(n) is not None]
    canonical: dict[Node, Node] = {}
    representatives: dict[tuple, list[Node]] = {}  # by (op, target): only computed values can repeat
    for node in (n for layer in layers for n in layer.inputs):
        if node in canonical:
            continue
        if node.op not in ("call_function", "call_method"):  # graph inputs (weights) are their own values
            canonical[node] = node
            continue
        roots, candidates = _roots(node), representatives.setdefault((node.op, node.target), [])
        canonical[node] = next(
            (
                r
                for r in candidates
                if same_value(r, node)
                and not any(order[r] < at < order[node] and written & roots for at, written in writes)
            ),
            node,
        )
        if canonical[node] is node:
            candidates.append(node)
    return canonical


def _input_aliases(layers: list[Layer], members: list[int], canonical: dict[Node, Node]) -> list[int]:
    """For each input slot of a group's layers, the first slot that holds the same value in every
    member (`_canonical_inputs`: e.g. the rotary tables cast once for q and once for k), so that the
    layer graph reads one placeholder for both and its ops on them compare equal."""
    inputs = [[canonical[n] for n in layers[p].inputs] for p in members]
    return [next(j for j in range(k + 1) if all(x[j] is x[k] for x in inputs)) for k in range(len(inputs[0]))]


def _one_number(nodes: list[Node]) -> bool:
    """The nodes hold one Python number (`specialised`: a symbolic scalar the guards pin, such as an
    unspecialised LayerNorm eps under dynamic=True), which a layer reads as a scalar: shared, never stacked."""
    values = [specialised(example_value(n)) for n in nodes]
    return isinstance(values[0], (int, float)) and all(type(v) is type(values[0]) and v == values[0] for v in values)


def _view_slice(nodes: list[Node]) -> tuple[Node, slice] | None:
    """(base, slice) when nodes are base[i0], base[i0 + d], ... (d >= 1), else None."""
    picks = []
    for n in nodes:
        if n.op != "call_function" or len(n.args) != 2 or n.kwargs:
            return None
        if n.target is operator.getitem and isinstance(n.args[1], int) and not isinstance(n.args[1], bool):
            picks.append((n.args[0], n.args[1]))
        else:
            return None
    bases = {b for b, _ in picks}
    idx = [i for _, i in picks]
    step = idx[1] - idx[0] if len(idx) > 1 else 1
    if len(bases) != 1 or step < 1 or idx != list(range(idx[0], idx[0] + step * len(idx), step)) or idx[0] < 0:
        return None
    return picks[0][0], slice(idx[0], idx[-1] + 1, step)


def _erase_unused(nodes: list[Node]) -> None:
    """Erase the `_pure` nodes among `nodes` that nothing reads, and then what only they read (layer
    inputs replaced by their canonical copy, the parallel layers' own copies of inputs that
    per_group shares): an eager inner compiler would run them on every call. A random draw stays:
    it advances the generator that later draws read."""
    todo, erased = list(nodes), set()
    while todo:
        node = todo.pop()
        if not node.users and node not in erased and _pure(node):
            todo.extend(node.all_input_nodes)
            node.graph.erase_node(node)
            erased.add(node)


def _graph_module_with(root: GraphModule, graph: Graph, added: dict[str, Tensor | nn.Module]) -> GraphModule:
    """GraphModule(root, graph) for a graph that also reads `added` (new buffers and submodules). `root`
    is left as it was, so the backend can still compile the original graph when it falls back."""
    registered = []
    try:
        for name, value in added.items():
            if isinstance(value, nn.Module):
                root.add_submodule(name, value)
            else:
                root.register_buffer(name, value, persistent=False)
            registered.append(name)
        return GraphModule(root, graph)
    finally:
        for name in registered:
            delattr(root, name)


def rewrite_stack(
    gm: GraphModule,
    match: LayerStackMatch,
    recipes: list[SurrogateRecipe],
    config: SNLPConfig,
    example_inputs: list,
    training: bool,
) -> tuple[GraphModule, StackedWeights]:
    """The rewritten GraphModule and the stacked weight buffers it reads."""
    layers = match.layers
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    canonical = _canonical_inputs(gm.graph, layers)
    stack_nodes = {n for layer in layers for n in layer.nodes}
    plans, batched = [], []
    for members in match.groups:
        rep = layers[members[0]]
        written = written_roots(rep.nodes, set(rep.nodes)) - set(rep.nodes)  # the inputs it writes, through views too
        slots, flags = [], []
        for k, node in enumerate(rep.inputs):
            nodes = [layers[p].inputs[k] for p in members]
            # an input the layers write is shared only where it is one node (a one-layer group): equal
            # copies (views of one tensor) would take every layer's write into one unbatched tensor
            if all(n is node if node in written else same_value(n, node) for n in nodes) or _one_number(nodes):
                slots.append(("shared", node))
                flags.append(False)
                continue
            flags.append(True)
            view = _view_slice(nodes)
            if view is not None:
                slots.append(("slice", view))
            elif node in written:
                raise NotAStack(
                    f"layer {rep.module_index} writes {node.name} in place, and the layers' copies "
                    "of it are not slices of one tensor"
                )
            elif not training and all(n.op == "placeholder" for n in nodes):
                slots.append(("placeholder", [placeholders.index(n) for n in nodes]))
            else:
                slots.append(("stack", nodes))
        plans.append(slots)
        batched.append(flags)

    graph = Graph()
    env: dict[Node, Node] = {}
    weights = StackedWeights()
    added: dict[str, Tensor | nn.Module] = {}
    for node in placeholders:
        env[node] = graph.node_copy(node, env.__getitem__)
        if hasattr(node, "_dynamo_source"):  # aot_autograd reads static inputs (CUDA graphs) from it
            env[node]._dynamo_source = node._dynamo_source
    for g, slots in enumerate(plans):
        for k, (kind, value) in enumerate(slots):
            if kind == "placeholder":
                name = f"snlp_stacked_g{g}_i{k}"
                added[name] = weights.add(value, example_inputs)
                env[(g, k)] = name
    gemv, eager = config.gemv and not training, config.inner == "eager"
    fused_kernels = eager and not training  # inductor fuses norms and rotary embeddings by itself
    aliases = [_input_aliases(layers, m, canonical) for m in match.groups]
    program = StackProgram(
        [
            layer_module(gm, layers[m[0]], gemv, fused_kernels=fused_kernels, eager=eager, aliases=a)
            for m, a in zip(match.groups, aliases, strict=True)
        ],
        [
            layer_module(gm, layers[m[0]], gemv, one_layer=True, fused_kernels=fused_kernels, eager=eager, aliases=a)
            for m, a in zip(match.groups, aliases, strict=True)
        ]
        if gemv or fused_kernels
        else None,
        match.groups,
        batched,
        recipes,
        config,
    )
    added["snlp_stack"] = program
    last = layers[-1].state_out
    for node in gm.graph.nodes:
        if node.op == "placeholder" or (node in stack_nodes and node is not last):
            continue
        if node is not last:
            env[node] = graph.node_copy(node, env.__getitem__)
            if gemv and is_bias_free_linear(node):  # e.g. the LM head: one GEMV at decode
                env[node].target = bias_free_linear
            continue
        per_group = []
        for g, slots in enumerate(plans):
            values = []
            for k, (kind, value) in enumerate(slots):
                if kind == "shared":
                    values.append(env[canonical[value]])
                elif kind == "slice":
                    values.append(graph.call_function(operator.getitem, (env[value[0]], value[1])))
                elif kind == "placeholder":
                    values.append(graph.get_attr(env[(g, k)]))
                else:
                    values.append(graph.call_function(torch.stack, ([env[n] for n in value],)))
            per_group.append(tuple(values))
        # `solve` calls layers one at a time only for the n_seq sequential ones; the parallel
        # layers read their inputs through per_group.
        per_layer = tuple(tuple(env[canonical[n]] for n in layer.inputs) for layer in layers[: config.n_seq])
        out = graph.call_module("snlp_stack", (env[layers[0].state_in], per_layer, tuple(per_group)))
        out.meta = dict(last.meta)
        env[last] = out
    # after the whole graph is copied: what follows the stack may read a layer's input too
    _erase_unused([env[n] for layer in layers for n in layer.inputs if n in env])
    new_gm = _graph_module_with(gm, graph, added)
    new_gm.graph.lint()
    # aot_autograd treats a graph as dynamo's (static parameters and marked inputs: CUDA graphs
    # without copies) by its meta and the sources of its parameters.
    new_gm.meta.update(gm.meta)
    sources = dict(getattr(gm, "_param_name_to_source", None) or {})
    for name, _ in new_gm.named_buffers():
        if name.startswith("snlp_stacked_"):
            sources[name] = LocalSource(name)
    new_gm._param_name_to_source = sources
    return new_gm, weights
