"""ONNX export of the rewritten graph: torch.export -> snlp_transform -> torch.export -> torch.onnx.

Invariants:

- A file computes what `snlp_transform(torch.export.export(model, args).module())` computes (the same
  SNLP configuration, fallbacks included), so onnxruntime reproduces the sequential model when
  `iters` reaches the block size; with `rewrite=False`, what the model computes.
- With `dynamic=True` the batch and sequence dims (dims 0 and 1 of every tensor input of two or
  more dims; of the decode step also the past length) are symbolic from the first trace on, and
  nothing in the rewrite pins them (ops whose vmap rules would pin a size run in vmap-safe forms,
  `batching.FOR_VMAP`): one file serves every (batch, length). The parallel layers are one batched op per
  layer op in the file (the stacked weights, vmapped layer graphs), not one op per layer.
- Attention, the layers' writes into their stacked KV cache and one-layer linears take ONNX
  translations of their own (`_TRANSLATIONS`): the same values, without the whole-cache copies and
  Einsums of torch.onnx's defaults.
- Only inference graphs export: a model in training mode and `gemv=True` are refused with a
  ValueError naming what to change.
- A file's outputs are the tensors of what the model returns, named by their keys where it has keys (a
  Hugging Face ModelOutput's `logits`); an object in it that torch.export cannot flatten (Hugging Face's
  DynamicCache) is refused with a ValueError naming it and `kwargs={"use_cache": False}`. A Hugging Face
  causal LM decodes (`decode=True`) on its own DynamicCache (`onnx_decode.HFStep`).

Needs the `onnx` extra (onnx, onnxscript; onnxruntime to run the files).
"""

from __future__ import annotations

import inspect
import logging
import operator
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.export import Dim
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils._pytree import TreeSpec, keystr, tree_flatten_with_path, tree_leaves, tree_unflatten

from ..config import SNLPConfig
from ..decoding.onnx_generate import INPUT_IDS, LOGITS, PAST, PRESENT, decode_path
from ..fx.values import SYMBOLIC, example_value
from ..passes.lowering.batching import FOR_VMAP, symbolic_result
from ..runtime.stack_program import StackProgram
from .fx_transform import snlp_transform
from .onnx_decode import Prefill, decode_step

logger = logging.getLogger("snlp_compile")

BATCH, SEQ, PAST_LEN = "batch", "seq", "past"
Dims = list[dict[int, str] | None]  # per input: its dynamic dims and their names in the file


def export_onnx(
    model: nn.Module,
    example_inputs: Sequence[Any],
    path: str | Path,
    config: SNLPConfig | dict | None = None,
    dynamic: bool = True,
    decode: bool = False,
    rewrite: bool = True,
    kwargs: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model`, its layer stack rewritten into the SNLP solve, to the ONNX file `path`; returns `path`.

    dynamic: batch and sequence dims symbolic (named "batch" and "seq" in the file); False pins every
        shape to `example_inputs`' shapes.
    decode: `path` gets the prefill model (`input_ids` -> `logits`, `present_keys`, `present_values`)
        and `<stem>.decode.onnx` a decode step on the stacked past keys/values (the layout of
        `snlp_compile.decoding.onnx_generate`, which runs both); `example_inputs` is then the token
        ids [B, T] alone. The prefill is rewritten when `config.prefill` is "snlp", else sequential.
    rewrite: False writes the model as it is (the sequential model, in the same layout: a baseline).
    kwargs: keyword arguments of every call, fixed in the file (a Hugging Face model's `use_cache=False`,
        where its output's DynamicCache is no tensor torch.export can write); tensors go in `example_inputs`.

    The file's outputs are the tensors of the model's output, named by their keys where it has keys (a
    Hugging Face model's `logits`). An output object that is neither a tensor nor a registered pytree
    node (a DynamicCache) is refused with a ValueError naming it and the ways around it. With
    `decode=True` a Hugging Face causal LM decodes on its DynamicCache (`onnx_decode.HFStep`).
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"path must end in .onnx, got {str(path)!r}")
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError as missing:
        raise ImportError("ONNX export needs the onnx extra: pip install 'snlp-compile[onnx]'") from missing
    config = SNLPConfig.from_options(config)
    if config.gemv:
        raise ValueError(
            "export_onnx: gemv=True routes linears through snlp::linear, which ONNX has no op for; use gemv=False"
        )
    if model.training:
        raise ValueError(
            f"export_onnx writes inference graphs and {type(model).__name__} is in training mode (dropout would "
            "draw at random in every onnxruntime call): call model.eval() first"
        )
    inputs, kwargs = tuple(example_inputs), dict(kwargs or {})
    fixed_tensors = [name for name, value in kwargs.items() if any(isinstance(x, Tensor) for x in tree_leaves(value))]
    if fixed_tensors:
        raise TypeError(
            f"export_onnx: kwargs are fixed in the file and {fixed_tensors} hold tensors: pass them in example_inputs"
        )
    layers = config if rewrite else None
    if not decode:
        dims = [{0: BATCH, 1: SEQ} if isinstance(x, Tensor) and x.dim() >= 2 else None for x in inputs]
        _write(_Call(model, kwargs), inputs, path, layers, dims if dynamic else None)
        return path
    if kwargs:
        raise ValueError(f"export_onnx: decode=True calls the model itself and takes no kwargs, got {sorted(kwargs)}")
    if not dynamic:
        raise ValueError("export_onnx: decode=True needs dynamic=True (the past length grows by one each step)")
    if len(inputs) != 1 or not isinstance(inputs[0], Tensor) or inputs[0].dim() != 2:
        raise ValueError("export_onnx: decode=True takes one example input, the token ids [B, T]")
    ids = inputs[0]
    prefill_layers = layers if config.prefill == "snlp" else None
    prefill = _Call(Prefill(decode_step(model, prefill_layers is None)), {}).eval()
    step = _Call(decode_step(model, layers is None), {}).eval()
    g, limits = step.model.geometry, step.model.limits
    past = [ids.new_zeros((g["n_layer"], ids.size(0), g["n_kv_head"], 2, g["head_dim"]), dtype=step.model.dtype)]
    past.append(past[0].clone())
    outputs = [LOGITS, *PRESENT]
    ids_dims, past_dims = {0: BATCH, 1: SEQ}, {1: BATCH, 3: PAST_LEN}
    _write(prefill, (ids,), path, prefill_layers, [ids_dims], ([INPUT_IDS], outputs), limits)
    names = ([INPUT_IDS, *PAST], outputs)
    _write(step, (ids, *past), decode_path(path), layers, [ids_dims, past_dims, past_dims], names, limits)
    return path


def _leaf_name(path: tuple) -> str:
    """An output's name from its pytree path: its keys, indices and attribute names joined by dots."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _output_names(spec: TreeSpec) -> list[str] | None:
    """The names of the outputs of a program whose output has the pytree structure `spec` (`_leaf_name`);
    None where the output is one bare tensor or two names are equal."""
    stand_ins = [torch.empty(()) for _ in range(spec.num_leaves)]  # tensors: some flatteners keep only those
    names = [_leaf_name(where) for where, _ in tree_flatten_with_path(tree_unflatten(stand_ins, spec))[0]]
    return names if len(names) == spec.num_leaves and all(names) and len(set(names)) == len(names) else None


class _Call(nn.Module):
    """`model(*inputs, **kwargs)`, what `_write` exports: its trace checks that every part of the output
    torch.export keeps is a tensor, a scalar or None."""

    def __init__(self, model: nn.Module, kwargs: Mapping[str, Any]) -> None:
        super().__init__()
        self.model, self.kwargs = model, dict(kwargs)
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        parameters = inspect.signature(model.forward).parameters.values()
        self.positional = [p.name for p in parameters if p.kind in positional]

    def input_names(self, count: int) -> list[str] | None:
        """The names of the model's first `count` positional parameters; None where it has fewer."""
        return self.positional[:count] if len(self.positional) >= count else None

    def forward(self, *inputs: Any) -> Any:
        out = self.model(*inputs, **self.kwargs)
        for where, leaf in tree_flatten_with_path(out)[0]:
            if not isinstance(leaf, (Tensor, int, float, bool, str, type(None))):
                kind = type(leaf).__name__
                raise ValueError(
                    f"export_onnx: {type(self.model).__name__} returns a {kind} at output{keystr(where)}, which "
                    f"torch.export cannot write (it is no tensor and no registered pytree node): pass "
                    f"kwargs={{'use_cache': False}} where that is a Hugging Face model's cache (the file then has the "
                    f"logits alone), register {kind} with torch.utils._pytree to write its tensors as outputs, or use "
                    "decode=True for the prefill and decode-step files with the keys and values stacked"
                )
        return out


def _widened(inputs: tuple, dims: Dims) -> tuple:
    """The inputs with every dynamic dim of size 1 doubled (repeated): torch.export pins a dim traced at
    size 0 or 1 to that size."""
    out = []
    for x, spec in zip(inputs, dims, strict=True):
        for d in spec or {}:
            if x.size(d) == 1:
                x = torch.cat([x, x], d)
        out.append(x)
    return tuple(out)


def _drop_dtype_assertions(gm: GraphModule) -> None:
    """Erase torch.export's checks of the traced dtypes (`aten._assert_tensor_metadata`, which torch.onnx
    drops too): vmap and decompositions cannot run them on symbolic sizes."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
    gm.recompile()


def _unattribute_size_arithmetic(gm: GraphModule) -> None:
    """Drop the module path of the scalars computed from the inputs' sizes alone (a key length P + T):
    torch.export computes each such expression once, in the module that first needs it, so a layer
    would otherwise pass it on to every later layer beside its state."""
    outside: set[Node] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            outside.add(node)
        elif node.all_input_nodes and set(node.all_input_nodes) <= outside and _scalar(node):
            outside.add(node)
            node.meta.pop("nn_module_stack", None)


def _scalar(node: Node) -> bool:
    """A node that computes a number (an integer or a symbolic scalar), not a tensor."""
    return isinstance(example_value(node), (int, *SYMBOLIC))


def _normalise(gm: GraphModule) -> None:
    """torch.export's graph as the passes and vmap read it, and the package's cache write as the op ONNX
    has: no dtype assertions, size arithmetic of the inputs outside the layers (`_unattribute_size_arithmetic`),
    `aten.select(x, 0, i)` as `x[i]` (per-layer picks of one tensor are then view slices, which the
    layers may write through), aten SDPA as `F.scaled_dot_product_attention` (which the rewrite batches
    over the layers as one call), `snlp::cache_write_` as `index_copy_` (its meaning), no detaches (an
    inference graph), and a cat of only the parts that add to it (`_cat_parts`)."""
    _drop_dtype_assertions(gm)
    _unattribute_size_arithmetic(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.select.int and node.args[1] == 0 and isinstance(node.args[2], int):
            node.target, node.args = operator.getitem, (node.args[0], node.args[2])
        elif node.target is torch.ops.aten.scaled_dot_product_attention.default:
            node.target = F.scaled_dot_product_attention
        elif node.target is torch.ops.snlp.cache_write_.default:
            node.target = torch.ops.aten.index_copy_.default
        elif node.target in (torch.ops.aten.detach_.default, torch.ops.aten.detach.default):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif node.target is torch.ops.aten.cat.default:
            node.args = (_cat_parts(node), *node.args[1:])
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _cat_parts(cat: Node) -> list[Node]:
    """The parts of `cat` that add to its result: those with elements, or where none has any, those of
    the result's rank (a legacy [0] tensor, which cat skips, or a zero-length past adds nothing). A part
    of another dtype stays: the result's dtype is promoted over it."""
    result, parts = example_value(cat), cat.args[0]

    def empty(part: Node) -> bool:
        value = example_value(part)
        return isinstance(value, Tensor) and value.dtype == result.dtype and statically_known_true(value.numel() == 0)

    full = [part for part in parts if not empty(part)]
    return full or [part for part in parts if getattr(example_value(part), "ndim", None) == result.dim()] or parts


def _lower_for_export(gm: GraphModule) -> None:
    """Every op of the layer graphs run under vmap whose vmap rule would pin a symbolic size
    (`batching.FOR_VMAP`) through its vmap-safe form, for the ops torch.export's decompositions produce."""
    for program in (m for m in gm.modules() if isinstance(m, StackProgram)):
        for layer in program.functions:
            for node in layer.graph.nodes:
                if node.op == "call_function" and node.target in FOR_VMAP and symbolic_result(node):
                    node.target = FOR_VMAP[node.target]
            layer.recompile()


def _onnx_attention(
    q: Any, k: Any, v: Any, mask: Any = None, is_causal: bool = False, scale: float | None = None
) -> Any:
    """snlp::attention in ONNX ops, for torch.onnx: softmax(q k^T * scale + mask) v, a bool mask keeping
    the scores where it is True, `is_causal` keeping key j <= query i (SDPA's top-left alignment)."""
    import onnx_ir as ir
    from onnxscript import opset18 as op

    rank = len(q.shape)
    scale = int(q.shape[-1]) ** -0.5 if scale is None else scale
    scores = op.Mul(op.MatMul(q, op.Transpose(k, perm=[*range(rank - 2), rank - 1, rank - 2])), op.CastLike(scale, q))
    if is_causal:
        rows = op.Range(0, op.Squeeze(op.Shape(q, start=-2, end=-1)), 1)
        cols = op.Range(0, op.Squeeze(op.Shape(k, start=-2, end=-1)), 1)
        mask = op.LessOrEqual(op.Unsqueeze(cols, [0]), op.Unsqueeze(rows, [1]))
    if is_causal or (mask is not None and mask.dtype == ir.DataType.BOOL):
        scores = op.Where(mask, scores, op.CastLike(float("-inf"), scores))
    elif mask is not None:
        scores = op.Add(scores, mask)
    return op.MatMul(op.Softmax(scores, axis=-1), v)


def _onnx_select_scatter(base: Any, src: Any, dim: int, index: int) -> Any:
    """aten.select_scatter (a layer's slice of a stacked cache written back) in ONNX ops, for torch.onnx:
    the slices before and after `index` concatenated around `src`, where torch.onnx's own translation
    scatters with an index per element (onnxruntime: about 4 ms for one layer's cache of the char GPT at
    512 positions)."""
    from onnxscript import opset18 as op

    dim %= len(base.shape)
    index = index if index >= 0 else index + int(base.shape[dim])
    axis = op.Constant(value_ints=[dim])
    before = op.Slice(base, op.Constant(value_ints=[0]), op.Constant(value_ints=[index]), axis)
    after = op.Slice(base, op.Constant(value_ints=[index + 1]), op.Constant(value_ints=[2**63 - 1]), axis)
    return op.Concat(before, op.Unsqueeze(src, axis), after, axis=dim)


def _onnx_index_put(base: Any, indices: Sequence[Any], values: Any, accumulate: bool = False) -> Any:
    """aten.index_put in ONNX ops, for torch.onnx: positions along one dim (a KV-cache write, `index_copy_`)
    as a ScatterElements whose index has the size of the values; any other form by torch.onnx's own
    translation, which moves the indexed dim to the front and back (two copies of a whole cache)."""
    import onnx_ir as ir
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops.core import aten_index_put

    dims = [d for d, index in enumerate(indices) if index is not None]
    index = indices[dims[0]] if len(dims) == 1 else None
    if accumulate or index is None or len(index.shape) != 1 or index.dtype == ir.DataType.BOOL:
        return aten_index_put(base, indices, values, accumulate)
    dim, rank = dims[0], len(base.shape)
    shape = op.Concat(op.Shape(base, end=dim), op.Shape(index), op.Shape(base, start=dim + 1), axis=0)
    index = op.Reshape(index, op.Constant(value_ints=[1] * dim + [-1] + [1] * (rank - dim - 1)))
    return op.ScatterElements(base, op.Expand(index, shape), op.Expand(values, shape), axis=dim)


def _onnx_slice_scatter(base: Any, src: Any, dim: int = 0, start: Any = None, end: Any = None, step: Any = 1) -> Any:
    """aten.slice_scatter in ONNX ops, for torch.onnx: a slice that covers the whole dim (the parallel
    layers' writes into their stacked cache) is `src` itself, where torch.onnx's own translation
    scatters every element; any other slice by that translation."""
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops.core import aten_slice_scatter

    size = base.shape[dim]
    whole = end is None or (isinstance(end, int) and isinstance(size, int) and end >= size)
    if start in (None, 0) and whole and step == 1:
        return op.Identity(src)
    return aten_slice_scatter(base, src, dim, start, end, step)


def _onnx_einsum(equation: str, tensors: Sequence[Any], path: Any = None) -> Any:
    """aten.einsum in ONNX ops, for torch.onnx: a linear's equation (`linear_by_einsum`, run on one layer
    outside vmap) as a MatMul, which onnxruntime runs faster than an Einsum."""
    from onnxscript import opset18 as op

    if equation.replace(" ", "") == "...i,oi->...o" and len(tensors) == 2:
        return op.MatMul(tensors[0], op.Transpose(tensors[1], perm=[1, 0]))
    return op.Einsum(*tensors, equation=equation)


_TRANSLATIONS = {
    torch.ops.snlp.attention.default: _onnx_attention,
    torch.ops.aten.select_scatter.default: _onnx_select_scatter,
    torch.ops.aten.slice_scatter.default: _onnx_slice_scatter,
    torch.ops.aten.index_put.default: _onnx_index_put,
    torch.ops.aten.einsum.default: _onnx_einsum,
}


def _write(
    module: _Call,
    inputs: tuple,
    path: Path,
    config: SNLPConfig | None,
    dims: Dims | None,
    names: tuple[list[str], list[str]] | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Export `module` (rewritten under `config`; None: as it is) to `path`, dims symbolic where `dims` says;
    inputs and outputs named by `names`, else by the model's parameters and its output's keys."""
    if dims is not None:
        inputs = _widened(inputs, dims)
    traced = None if dims is None else tuple(None if d is None else dict.fromkeys(d, Dim.DYNAMIC) for d in dims)
    with torch.no_grad(), warnings.catch_warnings():
        # `_Call.forward` takes `*inputs`: one argument to torch.export, whose graph then takes them one by one
        exported = torch.export.export(module, inputs, dynamic_shapes=None if traced is None else (traced,))
        graph = exported.module()
        _normalise(graph)
        if config is not None:
            graph = snlp_transform(graph, inputs, config)
            _lower_for_export(graph)
        program = torch.export.export(graph, inputs, dynamic_shapes=traced)
        _drop_dtype_assertions(program.graph_module)  # which torch.onnx's decompositions cannot run either
        input_names, output_names = names or (
            module.input_names(len(inputs)),
            _output_names(exported.call_spec.out_spec),
        )
        warnings.filterwarnings("ignore", message="# The axis name: .* will not be used")  # an input's dim named twice
        onnx_program = torch.onnx.export(
            program,
            inputs,
            dynamic_shapes=None if dims is None else tuple(dims),
            input_names=input_names,
            output_names=output_names,
            custom_translation_table=_TRANSLATIONS,
            dynamo=True,
            verbose=False,
        )
    onnx_program.model.metadata_props.update(metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program.save(str(path))
    logger.info("snlp: wrote %s (%s)", path, config if config is not None else "not rewritten")
