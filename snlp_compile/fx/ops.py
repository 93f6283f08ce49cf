"""The call targets passes recognise, one set per operation, each spelling dynamo and export record.

Invariant: a set holds only spellings of one out-of-place operation; in-place spellings
(`operator.iadd`, "add_") are separate sets, for passes that follow a value through them.
`aten_name` names the aten op behind any spelling, for passes that key on the op, not the spelling.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import Node

_aten = torch.ops.aten

ADD = {operator.add, torch.add, "add", _aten.add.Tensor}
SUB = {operator.sub, torch.sub, "sub", _aten.sub.Tensor}
MUL = {operator.mul, torch.mul, "mul", _aten.mul.Tensor, _aten.mul.Scalar}
DIV = {operator.truediv, torch.div, "div", _aten.div.Tensor, _aten.div.Scalar}
NEG = {operator.neg, torch.neg, "neg", _aten.neg.default}
MATMUL = {operator.matmul, torch.matmul, "matmul", _aten.matmul.default, torch.bmm, "bmm", _aten.bmm.default}
EINSUM = {torch.einsum, _aten.einsum.default}
CAT = {torch.cat, torch.concat, _aten.cat.default}
ADD_ = {operator.iadd, "add_"}
SUB_ = {operator.isub, "sub_"}
MUL_ = {operator.imul, "mul_"}
LINEAR = {F.linear, torch._C._nn.linear, _aten.linear, _aten.linear.default}
RMS_NORM = {torch.rms_norm, F.rms_norm}
INDEX_COPY_ = {torch.Tensor.index_copy_, _aten.index_copy_, _aten.index_copy_.default}


def calls(node: object, targets: set) -> bool:
    """`node` is a call_function or call_method node of one of `targets`."""
    op = getattr(node, "op", None)
    return op in ("call_function", "call_method") and node.target in targets


def aten_name(node: Node) -> str | None:
    """The name of the aten op a node calls (`dropout`, `bernoulli` for `bernoulli_`), if any."""
    if node.op == "call_method" and isinstance(node.target, str):
        return node.target.rstrip("_") or None
    if node.op != "call_function":
        return None
    schema = getattr(node.target, "_schema", None)
    name = schema.name.split("::")[-1] if schema is not None else getattr(node.target, "__name__", None)
    return name.rstrip("_") if isinstance(name, str) else None
