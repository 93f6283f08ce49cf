"""ONNX export of the rewritten graph: torch.export -> snlp_transform -> torch.export -> torch.onnx.

Invariants:

- A file computes what `snlp_transform(torch.export.export(model, args).module())` computes (the same
  SNLP configuration, fallbacks included), so onnxruntime reproduces the sequential model when
  `iters` reaches the block size; with `rewrite=False`, what the model computes.
- With `dynamic=True` the batch and sequence dims (dims 0 and 1 of every tensor input of two or
  more dims; of the decode step also the past length) are symbolic from the first trace on, and
  nothing in the rewrite pins them: one file serves every (batch, length). The parallel layers
  are one batched op per layer op in the file (the stacked weights, vmapped layer graphs), not one
  op per layer.
- Attention, the layers' writes into their stacked KV cache and one-layer linears take ONNX
  translations of their own (`_TRANSLATIONS`): the same values, without the whole-cache copies and
  Einsums of torch.onnx's defaults.
- Only inference graphs export: a model in training mode and `gemv=True` are refused with a
  ValueError naming what to change.

Needs the `onnx` extra (onnx, onnxscript; onnxruntime to run the files).
"""

from __future__ import annotations

import logging
import operator
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.export import Dim
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..config import SNLPConfig
from ..decoding.onnx_generate import INPUT_IDS, LOGITS, MAX_SEQ_LEN, PAST, PRESENT, VOCAB_SIZE, decode_path
from ..fx.values import SYMBOLIC, example_value
from ..runtime.stack_program import StackProgram
from .fx_transform import snlp_transform
from .onnx_decode import KVStep, Prefill

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
) -> Path:
    """Write `model`, its layer stack rewritten into the SNLP solve, to the ONNX file `path`; returns `path`.

    dynamic: batch and sequence dims symbolic (named "batch" and "seq" in the file); False pins every
        shape to `example_inputs`' shapes.
    decode: `path` gets the prefill model (`input_ids` -> `logits`, `present_keys`, `present_values`)
        and `<stem>.decode.onnx` a decode step on the stacked past keys/values (the layout of
        `snlp_compile.decoding.onnx_generate`, which runs both); `example_inputs` is then the token
        ids [B, T] alone. The prefill is rewritten when `config.prefill` is "snlp", else sequential.
    rewrite: False writes the model as it is (the sequential model, in the same layout: a baseline).
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
    inputs = tuple(example_inputs)
    layers = config if rewrite else None
    if not decode:
        dims = [{0: BATCH, 1: SEQ} if isinstance(x, Tensor) and x.dim() >= 2 else None for x in inputs]
        _write(model, inputs, path, layers, dims if dynamic else None)
        return path
    if not dynamic:
        raise ValueError("export_onnx: decode=True needs dynamic=True (the past length grows by one each step)")
    if len(inputs) != 1 or not isinstance(inputs[0], Tensor) or inputs[0].dim() != 2:
        raise ValueError("export_onnx: decode=True takes one example input, the token ids [B, T]")
    ids = inputs[0]
    prefill_layers = layers if config.prefill == "snlp" else None
    prefill, step = Prefill(model, prefill_layers is None).eval(), KVStep(model, layers is None).eval()
    g = step.geometry
    past = [ids.new_zeros((g["n_layer"], ids.size(0), g["n_kv_head"], 2, g["head_dim"]), dtype=step.template.k.dtype)]
    past.append(past[0].clone())
    limits = {MAX_SEQ_LEN: str(model.max_seq_len), VOCAB_SIZE: str(model.vocab_size)}
    outputs = [LOGITS, *PRESENT]
    ids_dims, past_dims = {0: BATCH, 1: SEQ}, {1: BATCH, 3: PAST_LEN}
    _write(prefill, (ids,), path, prefill_layers, [ids_dims], ([INPUT_IDS], outputs), limits)
    names = ([INPUT_IDS, *PAST], outputs)
    _write(step, (ids, *past), decode_path(path), layers, [ids_dims, past_dims, past_dims], names, limits)
    return path


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


def _normalise(gm: GraphModule) -> None:
    """torch.export's graph as the passes and vmap read it, and the package's cache write as the op ONNX
    has: no dtype assertions, `aten.select(x, 0, i)` as `x[i]` (per-layer picks of one tensor are then view slices,
    which the layers may write through), aten SDPA as `F.scaled_dot_product_attention` (which the
    rewrite batches over the layers as one call), `snlp::cache_write_` as `index_copy_` (its meaning)."""
    _drop_dtype_assertions(gm)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.select.int and node.args[1] == 0 and isinstance(node.args[2], int):
            node.target, node.args = operator.getitem, (node.args[0], node.args[2])
        elif node.target is torch.ops.aten.scaled_dot_product_attention.default:
            node.target = F.scaled_dot_product_attention
        elif node.target is torch.ops.snlp.cache_write_.default:
            node.target = torch.ops.aten.index_copy_.default
    gm.recompile()


def cat_for_vmap(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    """`torch.cat(tensors, dim)` under vmap with symbolic sizes, where vmap's rule for cat reads the sizes
    as integers and so pins them: parts of one size as a stack flattened into `dim`, parts of different
    sizes as the sum of the parts zero-padded to the whole (the same values, but that a -0.0 becomes 0.0)."""
    dim = dim % tensors[0].dim()
    sizes = [t.size(dim) for t in tensors]
    if all(statically_known_true(s == sizes[0]) for s in sizes):
        return torch.stack(list(tensors), dim).flatten(dim, dim + 1)
    total, start, out = sum(sizes), 0, None
    for t, size in zip(tensors, sizes, strict=True):
        padded = F.pad(t, (0, 0) * (t.dim() - 1 - dim) + (start, total - start - size))
        out = padded if out is None else out + padded
        start = start + size
    return out


def _symbolic_cat(node: Node) -> bool:
    """A cat whose result has a symbolic size."""
    if node.op != "call_function" or node.target not in (torch.ops.aten.cat.default, torch.cat):
        return False
    value = example_value(node)
    return isinstance(value, Tensor) and any(isinstance(s, SYMBOLIC) for s in value.shape)


def _lower_for_export(gm: GraphModule) -> None:
    """Every symbolic cat of the layer graphs run under vmap through `cat_for_vmap`."""
    for program in (m for m in gm.modules() if isinstance(m, StackProgram)):
        for layer in program.functions:
            for node in layer.graph.nodes:
                if _symbolic_cat(node):
                    node.target = cat_for_vmap
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
    module: nn.Module,
    inputs: tuple,
    path: Path,
    config: SNLPConfig | None,
    dims: Dims | None,
    names: tuple[list[str], list[str]] | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Export `module` (rewritten under `config`; None: as it is) to `path`, dims symbolic where `dims` says."""
    if dims is not None:
        inputs = _widened(inputs, dims)
    traced = None if dims is None else tuple(None if d is None else dict.fromkeys(d, Dim.DYNAMIC) for d in dims)
    with torch.no_grad(), warnings.catch_warnings():
        graph = torch.export.export(module, inputs, dynamic_shapes=traced).module()
        _normalise(graph)
        if config is not None:
            graph = snlp_transform(graph, inputs, config)
            _lower_for_export(graph)
        program = torch.export.export(graph, inputs, dynamic_shapes=traced)
        _drop_dtype_assertions(program.graph_module)  # which torch.onnx's decompositions cannot run either
        input_names, output_names = names or (None, None)
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
