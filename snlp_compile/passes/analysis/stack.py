"""What analysis finds: the layers of a stack, as functions of their state.

Invariants are those of `detect.detect_layer_stack`, which builds these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.fx import Node

from ...fx.args import Use


class NotAStack(Exception):
    """The graph holds no layer stack the rewrite can prove safe; the message says why."""


@dataclass
class Layer:
    """One layer of the stack, as a function of its state: `nodes` (graph order) compute `state_out`
    from `state_in` (read at `state_uses`) and `inputs` (values computed without the stack); layers
    with equal `key` have identical structure and input shapes."""

    module_index: int
    nodes: list[Node]
    state_in: Node
    state_out: Node
    state_uses: set[Use]
    inputs: list[Node] = field(default_factory=list)
    key: tuple = ()


@dataclass
class LayerStackMatch:
    """The stack: consecutive `layers` of `container`; `groups` lists the positions of layers with
    one structure (evaluated together with stacked weights); `excluded` the leading module indices
    that run before the stack."""

    container: str
    layers: list[Layer]
    groups: list[list[int]]
    excluded: list[int]

    def describe(self) -> str:
        first, last = self.layers[0].module_index, self.layers[-1].module_index
        sizes = "+".join(str(len(g)) for g in self.groups)
        groups = f"{len(self.groups)} layer group(s) ({sizes})"
        return f"{len(self.layers)} layers of {self.container}[{first}..{last}] in {groups}"
