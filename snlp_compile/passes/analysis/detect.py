"""Find the layer stack of a dynamo FX graph.

Invariants of a returned `LayerStackMatch` (anything else raises `NotAStack` with the reason):

- Layers are consecutive entries of one indexed module container (`blocks.3`, `blocks[3]`,
  `_modules['3']` spellings, or children numbered `<prefix><i>` such as torchvision's
  `encoder_layer_3`: `stack.layer_key`; the outermost numbering a node is in), in graph order;
  glue the parent's loop applies between two layers (nanochat's x0 mixing) belongs to the layer
  after it.
- Each layer is a function of exactly one stack value, its state: `layers[l].state_out` feeds
  only layer l+1, and every other input of a layer is computed without the stack (parameters,
  constants, side inputs such as x0, rotary tables, masks). State in and out have equal
  shape and dtype.
- `Layer.nodes` holds only nodes that depend on the state; nodes of a layer that do not
  (lambda lookups, mixing matrices, masks) stay in the graph and become the layer's inputs.
- Layers with equal `key` have identical structure and input shapes: they can be evaluated
  together with their per-layer inputs stacked on a leading axis.
- The stack passes `checks.check_chain` (global state, gradient flow, writes, random draws).
- A tensor the layer allocates and writes is in `Layer.nodes`, with what reads it: every
  evaluation of the layer allocates its own.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import guard_bool

from ...fx.args import Use, flat_args
from ...fx.closures import backward_closure, forward_closure
from ...fx.equality import is_pure
from ...fx.values import example_value, freeze, specialised, value_signature
from ...fx.writes import mutated_arg, written_roots
from .checks import check_chain, check_taps, glue_nodes
from .stack import Layer, LayerStackMatch, NotAStack, layer_key


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
                ref = ("const", freeze(value))
            args.append((path, ref))
        target = n.target if n.op != "call_module" else ("module", str(n.target))
        items.append((n.op, target, tuple(args)))
    inputs = list(slots)
    return (tuple(items), tuple(value_signature(i) for i in inputs)), inputs


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
        elif freeze(p) != freeze(c):
            return False
    return True


def detect_layer_stack(gm: GraphModule) -> LayerStackMatch:
    """Find the layer stack of `gm` or raise NotAStack with the reason."""
    graph_nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(graph_nodes)}
    keyed: dict[tuple[str, int], list[Node]] = defaultdict(list)
    for n in graph_nodes:
        dead = not n.users and is_pure(n)  # e.g. a size computation dynamo left unused: no part of a layer
        if n.op in ("call_function", "call_method", "call_module") and not dead:
            key = layer_key(n)
            if key is not None:
                keyed[key].append(n)
    if not keyed:
        raise NotAStack(
            "no node was traced inside an indexed module container (nn.ModuleList / nn.Sequential, or two or more "
            "children numbered <prefix><i>, <prefix><i+1>, ...)"
        )
    counts = Counter(container for container, _ in keyed)
    container, count = counts.most_common(1)[0]
    if count < 2:
        raise NotAStack(f"only one layer of {container} is in this graph")
    indices = sorted(i for c, i in keyed if c == container)
    if indices != list(range(indices[0], indices[0] + len(indices))):
        raise NotAStack(f"the layers of {container} in this graph are not consecutive: {indices}")
    regions = [set(keyed[(container, i)]) for i in indices]

    non_keyed = {n for n in graph_nodes if layer_key(n) is None and n.op != "placeholder"}
    leaving = [sorted((n for n in r if any(u not in r for u in n.users)), key=position.__getitem__) for r in regions]
    outs = _states_leaving(container, indices, regions, leaving, non_keyed, position)
    layers: list[Layer | None] = [None] * len(indices)
    for pos in range(1, len(indices)):
        prev_out, region = outs[pos - 1], regions[pos]
        between = forward_closure({prev_out}, non_keyed)
        glue = backward_closure(region, between)
        full = glue | region
        # the state, or glue computed from it, may be read outside the stack (a tap), not by another layer
        stray = [(n, u) for n in (prev_out, *glue) for u in n.users if u not in full and layer_key(u) is not None]
        if stray:
            state, user = stray[0]
            what = "the state" if state is prev_out else f"{state.name}, computed from the state"
            raise NotAStack(
                f"{what} leaving {container}.{indices[pos - 1]} is also used outside "
                f"{container}.{indices[pos]} (by {user.name}): not a chain (a layer that reads an older state "
                "than its input is inherently sequential)"
            )
        layers[pos] = _make_layer(indices[pos], full, prev_out, _uses_of(prev_out, full), outs[pos], position)
    layers[0] = _first_layer(indices[0], regions, outs, layers, position)
    excluded = []
    if layers[0] is None:
        excluded.append(indices[0])
        layers = layers[1:]
    check_chain(container, layers)
    if len(layers) < 2:
        raise NotAStack(f"fewer than two layers of {container} form a chain")
    for layer, region_leaving in zip(layers, leaving[len(leaving) - len(layers) :], strict=True):
        own = set(layer.nodes)
        layer.side_outputs = [n for n in region_leaving if n is not layer.state_out and n in own]
    groups = _group(layers)
    taps = _taps(layers)
    check_taps(container, layers, taps)
    return LayerStackMatch(container, layers, groups, excluded, taps)


def _states_leaving(
    container: str,
    indices: list[int],
    regions: list[set[Node]],
    leaving: list[list[Node]],
    outside: set[Node],
    position: dict[Node, int],
) -> list[Node]:
    """Each layer's state: of the values leaving its module, the one the next layer's module reads
    (through glue outside both); the last layer's is its only one, else `_state_like`. The other
    values leaving a layer (a DynamicCache's keys and values) are its side outputs."""
    states = []
    for pos, (region, values) in enumerate(zip(regions, leaving, strict=True)):
        if pos + 1 < len(regions):
            following = regions[pos + 1]
            feeding = [n for n in values if forward_closure({n}, outside | following) & following]
        elif len(values) == 1:
            feeding = values
        else:
            feeding = _state_like(region, values, regions[:pos], states, position)
        if len(feeding) != 1:
            names = ", ".join(n.name for n in (feeding or values)) or "nothing"
            raise NotAStack(
                f"layer {container}.{indices[pos]} passes {len(feeding) if feeding else len(values)} values on "
                f"({names}); a stack layer passes one state to the next"
            )
        states.append(feeding[0])
    return states


def _state_like(
    region: set[Node], values: list[Node], earlier: list[set[Node]], states: list[Node], position: dict[Node, int]
) -> list[Node]:
    """The last layer's state among the values leaving it: the one at the place of an earlier layer's
    state in a module of as many nodes (the latest such layer), else the one traced like the state."""
    nodes = sorted(region, key=position.__getitem__)
    for other, state in zip(reversed(earlier), reversed(states), strict=True):
        if len(other) == len(nodes):
            place = sorted(other, key=position.__getitem__).index(state)
            return [nodes[place]] if nodes[place] in values else []
    return [n for n in values if value_signature(n) == value_signature(states[-1])]


def _taps(layers: list[Layer]) -> list[int]:
    """The positions of the layers before the last whose output state is also read outside the stack,
    directly or through the glue of the layer after it (`checks.tap_readers` recomputes that glue)."""
    inside = {n for layer in layers for n in layer.nodes}
    read = {n for n in inside for u in n.users if u not in inside}
    return [
        p
        for p, layer in enumerate(layers[:-1])
        if layer.state_out in read or any(n in read for n in glue_nodes(layers[p + 1]))
    ]


def _make_layer(
    index: int, region: set[Node], state_in: Node, state_uses: set[Use], state_out: Node, position: dict
) -> Layer:
    # A tensor the layer allocates and writes in place is its scratch: allocated in every evaluation
    # of the layer, never hoisted (shared by layers, kept across Newton iterations). Nodes reading a
    # tensor the layer writes in place must run after the write: keep them in.
    written = {mutated_arg(n) for n in region} - {None}
    scratch = written_roots(region, region) & region
    starts = {u for u, _ in state_uses} | scratch | {n for n in region if set(n.all_input_nodes) & written}
    dependent = (starts | forward_closure(starts, region)) & region
    if state_out not in dependent:
        raise NotAStack(f"the output of layer {index} does not depend on its input")
    nodes = sorted(dependent, key=position.__getitem__)
    key, inputs = _canonical(nodes, state_uses)
    return Layer(index, nodes, state_in, state_out, state_uses, inputs, (key, value_signature(state_in)))


def _alpha(key: object, names: dict[str, int]) -> object:
    """`key` with each symbol named by the order it first appears in (two layers whose sizes differ only
    in their symbols' names get one key)."""
    if isinstance(key, tuple) and len(key) == 2 and key[0] == "sym" and isinstance(key[1], str):
        return ("sym", names.setdefault(key[1], len(names)))
    if isinstance(key, tuple):
        return tuple(_alpha(k, names) for k in key)
    return key


def _symbols(layer: Layer) -> list:
    """The unpinned symbolic sizes of the layer's inputs, in the order `_alpha` numbers them."""
    found = []
    for node in layer.inputs:
        value = example_value(node)
        if isinstance(value, torch.Tensor):
            found.extend(size for size in value.shape if isinstance(specialised(size), torch.SymInt))
    return found


def _group(layers: list[Layer]) -> list[list[int]]:
    """Positions of the layers of one structure. Layers whose sizes differ only in the names of their
    symbols join a group where the sizes are equal now; that equality becomes a guard (dynamo compiles
    the frame again where it fails), so the group's stacked inputs have one shape."""
    groups: dict[tuple, list[tuple[list, list[int]]]] = {}
    for pos, layer in enumerate(layers):
        sides = tuple(layer.nodes.index(n) for n in layer.side_outputs)
        candidates = groups.setdefault((_alpha(layer.key, {}), sides), [])
        symbols = _symbols(layer)
        hints = [s.node.hint for s in symbols]
        group = next((g for g in candidates if [s.node.hint for s in g[0]] == hints and None not in hints), None)
        if group is None:
            candidates.append((symbols, [pos]))
            continue
        for mine, theirs in zip(symbols, group[0], strict=True):
            guard_bool(mine == theirs)
        group[1].append(pos)
    return [members for candidates in groups.values() for _, members in candidates]


def _match_onto_first(later: Layer, nodes: list[Node], nodes0: list[Node], region0: set[Node]) -> dict | None:
    """Match a later layer's region (`nodes`, graph order) onto layer 0's (`nodes0`) node by node:
    {"state": layer 0's state, "state_uses": its uses, "glue": layer 0's glue}, or None where the two
    differ. An argument that is the later layer's state (or its glue) marks a state use in layer 0."""
    if len(nodes) != len(nodes0):
        return None
    glue = set(later.nodes) - set(nodes)
    index_of = {n: i for i, n in enumerate(nodes)}
    found: dict = {"state_uses": set()}

    def argument_matches(p: Node, c: Any, c_node: Node, path: tuple) -> bool:
        if not isinstance(c, Node) or (p in index_of) != (c in region0):
            return False
        if p in index_of:
            return nodes0[index_of[p]] is c
        if p is later.state_in:
            found["state_uses"].add((c_node, path))
            return found.setdefault("state", c) is c
        return p not in glue or _match_glue(p, c, glue, later.state_in, found)

    for p_node, c_node in zip(nodes, nodes0, strict=True):
        p_args, c_args = list(flat_args(p_node)), list(flat_args(c_node))
        if (p_node.op, p_node.target) != (c_node.op, c_node.target) or [a for a, _ in p_args] != [a for a, _ in c_args]:
            return None
        pairs = zip(p_args, c_args, strict=True)
        if not all(argument_matches(p, c, c_node, path) for (path, p), (_, c) in pairs if isinstance(p, Node)):
            return None
    return found if "state" in found else None


def _first_layer(index: int, regions: list, outs: list, layers: list, position: dict) -> Layer | None:
    """Layer 0 has no previous layer to delimit its glue and state: the first later layer that
    matches onto it (`_match_onto_first`) gives them, even where layer 0's state is also a side
    input (x0). None when no later layer matches, or layer 0's glue is used elsewhere too."""
    nodes0 = sorted(regions[0], key=position.__getitem__)
    for pos in range(1, len(regions)):
        found = _match_onto_first(layers[pos], sorted(regions[pos], key=position.__getitem__), nodes0, regions[0])
        if found is None:
            continue
        glue0 = found.get("glue", set())
        full = regions[0] | glue0
        if any(u not in full and layer_key(u) is not None for g in glue0 for u in g.users):
            return None  # glue another layer reads (read outside the stack, it is computed there too)
        try:
            return _make_layer(index, full, found["state"], found["state_uses"], outs[0], position)
        except NotAStack:
            return None
    return None
