"""What analysis finds: the layers of a stack, as functions of their state.

Invariants are those of `detect.detect_layer_stack`, which builds these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch.fx import Node

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


_INDEXED = re.compile(r"^(.*)\.(\d+)$")


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
