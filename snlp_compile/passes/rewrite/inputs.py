"""Layer-input canonicalisation and the plan of each layer group's input slots.

Invariants: `canonical_inputs` maps a layer input to an earlier one only where both compute the same
value (`fx.equality.same_value`) and nothing in between writes what they are computed from; an
`InputSlot` of kind "shared" holds one value for every layer of the group, "slice" a view
`base[slice]` of one tensor with each layer's value on its leading axis (so in-place writes reach
the original), "stack" one node per layer, stacked at call time (or, for "cached" stack slots of
graph inputs, once, by `runtime.StackedWeights`), "copied" one node per layer that the layer
writes: stacked at call time, each evaluation of a layer writes a fresh copy (`layer_graph`), and
the copy of its last evaluation is copied back into the layer's own tensor.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import guard_bool

from ...fx.capture import source_name
from ...fx.closures import backward_closure
from ...fx.equality import same_value
from ...fx.values import SYMBOLIC, example_value, specialised
from ...fx.writes import alias_roots, declared_write, mutated_arg, overwrite_places, written_roots
from ..analysis import Layer, LayerStackMatch, NotAStack


def _roots(node: Node) -> set[Node]:
    """The graph inputs (placeholders, get_attrs) whose values `node` is computed from."""
    return {n for n in backward_closure({node}) | {node} if n.op in ("placeholder", "get_attr")}


def canonical_inputs(graph: Graph, layers: list[Layer]) -> dict[Node, Node]:
    """Each layer input -> the first layer input that computes the same value (`same_value`) with no
    in-place write to what it is computed from in between (e.g. every layer's rotary tables cast to
    its dtype -> layer 0's): the rewritten graph computes each such value once, where an eager inner
    compiler would run every copy on every call. An input a layer writes is its own (two equal zero
    caches, one for keys and one for values, stay two tensors)."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    writes = [(order[n], _roots(n)) for n in graph.nodes if mutated_arg(n) is not None]
    written = {root for layer in layers for root in written_roots(layer.nodes, set(layer.nodes))}
    canonical: dict[Node, Node] = {}
    representatives: dict[tuple, list[Node]] = {}  # by (op, target): only computed values can repeat
    for node in (n for layer in layers for n in layer.inputs):
        if node in canonical:
            continue
        if node.op not in ("call_function", "call_method") or node in written:  # its own value
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


def input_aliases(layers: list[Layer], members: list[int], canonical: dict[Node, Node]) -> list[int]:
    """For each input slot of a group's layers, the first slot that holds the same value in every
    member (`canonical_inputs`: e.g. the rotary tables cast once for q and once for k), so that the
    layer graph reads one placeholder for both and its ops on them compare equal."""
    inputs = [[canonical[n] for n in layers[p].inputs] for p in members]
    return [next(j for j in range(k + 1) if all(x[j] is x[k] for x in inputs)) for k in range(len(inputs[0]))]


def _one_number(nodes: list[Node]) -> bool:
    """The nodes hold one Python number, which a layer reads as a scalar: shared, never stacked. A
    symbolic scalar counts as its pinned value (`specialised`: an unspecialised LayerNorm eps under
    dynamic=True); unpinned ones (a cache length each layer holds) count where they are equal now,
    and that equality becomes a guard (dynamo compiles the frame again where it fails)."""
    values = [specialised(example_value(n)) for n in nodes]
    hints = [v.node.hint if isinstance(v, SYMBOLIC) else v for v in values]
    if not isinstance(hints[0], (int, float)) or not all(type(h) is type(hints[0]) and h == hints[0] for h in hints):
        return False
    for value in values[1:]:
        if isinstance(value, SYMBOLIC) or isinstance(values[0], SYMBOLIC):
            guard_bool(value == values[0])
    return True


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


@dataclass(frozen=True)
class InputSlot:
    """How input k of a layer group reaches its layers (see the module docstring): `value` is the node
    (shared), (base, slice) (slice), the per-layer nodes (stack) or their placeholder positions
    (cached); `batched`: it differs between the layers (a leading layer axis under vmap)."""

    kind: str
    value: object

    @property
    def batched(self) -> bool:
        return self.kind != "shared"


def _weight(node: Node) -> bool:
    """A graph input that holds module state (a parameter or buffer, by its dynamo source) of fixed
    shape: worth stacking once. Call inputs (a cache's tensors, new every step or growing) are
    stacked in the graph on each call."""
    source = getattr(node, "_dynamo_source", None)
    name = source_name(source) if source is not None else ""
    if source is not None and "._parameters[" not in name and "._buffers[" not in name:
        return False
    value = example_value(node)
    return not any(isinstance(specialised(size), torch.SymInt) for size in getattr(value, "shape", ()))


def _check_copied_writes(layer: Layer, node: Node) -> None:
    """A "copied" input is written under vmap into a per-layer copy: only by ops that declare the write
    (index_copy_, add_, setitem, ...), whose batching rules write each layer's copy. An op that writes
    it without declaring so (F.batch_norm's running statistics) is refused: vmap drops such writes."""
    own = set(layer.nodes)
    for writer in layer.nodes:
        target = mutated_arg(writer)
        if target is not None and node in alias_roots(target, own) and declared_write(writer) is None:
            raise NotAStack(
                f"{writer.name} in layer {layer.module_index} writes {node.name}, each layer's own tensor, without "
                "declaring the write (as batch_norm updates its running statistics): vmap would not batch it"
            )


def _writes_idempotently(layer: Layer, node: Node) -> bool:
    """Evaluating the layer again on the tensor it wrote leaves what one evaluation leaves, so Newton
    iterations may write `node`'s memory directly (a "slice"): every write into it overwrites
    (`overwrite_places`), at places (index, mask, the view written through) computed without the
    state, with values that do not read that memory, and nothing in the layer reads the memory
    before its first write. A cache written at the positions of this step is; a count incremented
    in place (`add_`), a window rolled in place or a state-dependent scatter is not: each evaluation
    needs a fresh copy ("copied")."""
    own = set(layer.nodes)
    first_write = None
    for position, writer in enumerate(layer.nodes):
        target = mutated_arg(writer)
        if target is None or node not in alias_roots(target, own):
            continue
        places = overwrite_places(writer)
        if places is None:
            return False
        first_write = position if first_write is None else first_write
        sources = {a for a in writer.all_input_nodes if a is not target}
        read = sources | backward_closure(sources, own | set(layer.inputs))
        if any(node in alias_roots(n, own) for n in read):  # the written values read what they overwrite
            return False
        chosen = {*places, target}
        if layer.state_in in chosen | backward_closure(chosen, own | {layer.state_in}):  # places move with the state
            return False
    before = layer.nodes[: first_write or 0]
    return not any(
        node not in alias_roots(n, own) and any(node in alias_roots(a, own) for a in n.all_input_nodes) for n in before
    )


def plan_slots(gm_placeholders: list[Node], match: LayerStackMatch, cache_graph_inputs: bool) -> list[list[InputSlot]]:
    """The input slots of each layer group; `cache_graph_inputs`: per-layer graph inputs (weights at
    inference) are stacked once and kept current rather than stacked inside the graph on each call.
    An input the layers write whose per-layer copies are not slices of one tensor (a cache keeping one
    tensor per layer) is "copied": each evaluation writes a copy of it, and the last one is copied back."""
    layers, plans = match.layers, []
    for members in match.groups:
        rep = layers[members[0]]
        written = written_roots(rep.nodes, set(rep.nodes)) - set(rep.nodes)  # the inputs it writes, through views too
        slots = []
        for k, node in enumerate(rep.inputs):
            nodes = [layers[p].inputs[k] for p in members]
            # an input the layers write is shared only where it is one node (a one-layer group): equal
            # copies (views of one tensor) would take every layer's write into one unbatched tensor
            if all(n is node if node in written else same_value(n, node) for n in nodes) or _one_number(nodes):
                slots.append(InputSlot("shared", node))
            elif (view := _view_slice(nodes)) is not None and (node not in written or _writes_idempotently(rep, node)):
                slots.append(InputSlot("slice", view))
            elif node in written:
                _check_copied_writes(rep, node)
                slots.append(InputSlot("copied", nodes))
            elif cache_graph_inputs and all(n.op == "placeholder" and _weight(n) for n in nodes):
                slots.append(InputSlot("cached", [gm_placeholders.index(n) for n in nodes]))
            else:
                slots.append(InputSlot("stack", nodes))
        plans.append(slots)
    return plans
