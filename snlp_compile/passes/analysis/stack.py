"""What analysis finds: the layers of a stack, as functions of their state.

Invariants are those of `detect.detect_layer_stack`, which builds these.
"""

from __future__ import annotations

import re
import weakref
from collections import defaultdict
from dataclasses import dataclass, field

from torch.fx import Graph, Node

from ...fx.args import Use


class NotAStack(Exception):
    """The graph holds no layer stack the rewrite can prove safe; the message says why."""


@dataclass
class Layer:
    """One layer of the stack, as a function of its state: `nodes` (graph order) compute `state_out`
    from `state_in` (read at `state_uses`) and `inputs` (values computed without the stack); layers
    with equal `key` have identical structure and input shapes; `side_outputs` are the other values
    computed from the state that leave the layer, read only outside the stack (a DynamicCache's
    keys and values): the solve returns them from each layer's last evaluation."""

    module_index: int
    nodes: list[Node]
    state_in: Node
    state_out: Node
    state_uses: set[Use]
    inputs: list[Node] = field(default_factory=list)
    key: tuple = ()
    side_outputs: list[Node] = field(default_factory=list)  # other values it passes out of the stack


@dataclass
class LayerStackMatch:
    """The stack: consecutive `layers` of `container`; `groups` lists the positions of layers with
    one structure (evaluated together with stacked weights); `excluded` the leading module indices
    that run before the stack; `taps` the positions of the layers before the last whose output state
    is also read outside the stack (collected hidden states, a backout, an auxiliary head): the
    solve returns its estimate of those states too."""

    container: str
    layers: list[Layer]
    groups: list[list[int]]
    excluded: list[int]
    taps: list[int] = field(default_factory=list)

    def describe(self) -> str:
        first, last = self.layers[0].module_index, self.layers[-1].module_index
        sizes = "+".join(str(len(g)) for g in self.groups)
        groups = f"{len(self.groups)} layer group(s) ({sizes})"
        taps = f", tapped after {[self.layers[p].module_index for p in self.taps]}" if self.taps else ""
        return f"{len(self.layers)} layers of {self.container}[{first}..{last}] in {groups}{taps}"


_INDEXED = re.compile(r"^(.*)\.(\d+)$")  # (container, index): children "0", "1", ... of a list or sequential
_NUMBERED = re.compile(r"^(.*)\.([^.]*[^.\d])(\d+)$")  # (parent, prefix, index): children "<prefix><i>"
# per graph: its node count when last read, and the (parent, prefix) pairs that number a stack's entries
_NUMBERED_CHILDREN: weakref.WeakKeyDictionary[Graph, tuple[int, frozenset[tuple[str, str]]]] = (
    weakref.WeakKeyDictionary()
)


def _normalise(path: str) -> str:
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    return re.sub(r"\[(\d+)\]", r".\1", path)


def _traced_in(node: Node) -> list[str]:
    """The normalised paths of the modules the node was traced in, outermost first."""
    entries = (node.meta.get("nn_module_stack") or {}).values()
    return [_normalise(entry[0] if isinstance(entry, tuple) else str(entry)) for entry in entries]


def _numbered_children(graph: Graph) -> frozenset[tuple[str, str]]:
    """The (parent, prefix) pairs whose children `<prefix><i>` traced in `graph` (torchvision's
    `encoder_layer_<i>` in an nn.Sequential built from an OrderedDict, `block1`, `block2` ...) are two or
    more with consecutive indices: entries of a stack, as a list's "0", "1", ... are."""
    cached = _NUMBERED_CHILDREN.get(graph)
    if cached is not None and cached[0] == len(graph.nodes):
        return cached[1]
    indices: dict[tuple[str, str], set[int]] = defaultdict(set)
    for node in graph.nodes:
        for path in _traced_in(node):
            match = _NUMBERED.match(path)
            if match:
                indices[match.group(1), match.group(2)].add(int(match.group(3)))
    found = frozenset(k for k, seen in indices.items() if len(seen) > 1 and max(seen) - min(seen) < len(seen))
    _NUMBERED_CHILDREN[graph] = (len(graph.nodes), found)
    return found


def layer_key(node: Node) -> tuple[str, int] | None:
    """(container, index) of the outermost indexed module the node was traced in: a child "<i>" of
    `container` (a list or sequential), or a child "<prefix><i>" of a module numbering its children
    (`_numbered_children`), whose container is spelled "<parent>.<prefix>"."""
    paths = _traced_in(node)
    numbered = _numbered_children(node.graph) if paths else frozenset()
    for path in paths:
        match = _INDEXED.match(path)
        if match:
            return match.group(1), int(match.group(2))
        match = _NUMBERED.match(path)
        if match and (match.group(1), match.group(2)) in numbered:
            return f"{match.group(1)}.{match.group(2)}", int(match.group(3))
    return None


def module_paths(container: str, index: int) -> tuple[str, str]:
    """The paths layer `index` of a `layer_key` container can have: "<container>.<i>" (a list's child)
    or "<container><i>" (a numbered child "<prefix><i>", its container spelled "<parent>.<prefix>")."""
    return f"{container}.{index}", f"{container}{index}"
