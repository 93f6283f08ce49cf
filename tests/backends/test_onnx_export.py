"""ONNX export: one file with symbolic batch and length matches PyTorch at every shape, the parallel
layers are batched ops in it, and what cannot be exported is refused with the option to change."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from snlp_compile import SNLPConfig, export_onnx, snlp_transform
from snlp_compile.models import GPT, MHCGPT, GPTConfig

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SHAPES = [(1, 1), (3, 17), (2, 64)]  # (batch, length): the trace widens size-1 dims, so these differ from it


def session(path):
    onnx.checker.check_model(str(path), full_check=True)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(sess, *inputs):
    return sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs, strict=True)})


def dims(values):
    return [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values]


def matmuls(path) -> int:
    return sum(n.op_type in ("MatMul", "Gemm", "Einsum") for n in onnx.load(str(path)).graph.node)


@torch.no_grad()
def test_one_dynamic_file_matches_the_model_at_every_batch_and_length(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", n_layer=3)).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Exporting a model while it is in training mode")  # it is not
        path = export_onnx(model, (torch.randint(0, 64, (1, 12)),), tmp_path / "gpt.onnx", {"iters": 3})
    sess = session(path)
    graph = onnx.load(str(path)).graph
    assert dims(graph.input) == [["batch", "seq"]] and dims(graph.output) == [["batch", "seq", 64]]
    for batch, length in SHAPES:
        idx = torch.randint(0, 64, (batch, length))
        np.testing.assert_allclose(run(sess, idx)[0], model(idx).numpy(), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_one_iteration_matches_the_torch_rewrite_at_every_shape(tmp_path):
    """The approximate regime (mHC, HCN surrogate, K=1): the file computes what snlp_transform computes."""
    torch.manual_seed(0)
    model = MHCGPT(GPTConfig.preset("tiny", n_layer=3, sinkhorn_iters=4)).eval()
    config = {"iters": 1, "fallback": "error"}
    sess = session(export_onnx(model, (torch.randint(0, 64, (2, 8)),), tmp_path / "mhc.onnx", config))
    for batch, length in SHAPES:
        idx = torch.randint(0, 64, (batch, length))
        rewritten = snlp_transform(torch.export.export(model, (idx,)).module(), (idx,), config)(idx).numpy()
        onnx_logits = run(sess, idx)[0]
        np.testing.assert_allclose(onnx_logits, rewritten, atol=1e-4, rtol=1e-4)
        assert np.abs(onnx_logits - model(idx).numpy()).max() > 1e-3  # one iteration is an approximation


@torch.no_grad()
def test_the_parallel_layers_are_batched_ops_and_static_shapes_are_pinned(tmp_path):
    """Per Newton iteration the six linears and two attention products of all layers are one MatMul each,
    the LM head one more: 8 * iters + 1 MatMuls for 6 layers (8 * 6 + 1 run sequentially, n_seq = 5)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", n_layer=6)).eval()
    idx = torch.randint(0, 64, (2, 8))
    batched = export_onnx(model, (idx,), tmp_path / "k1.onnx", {"iters": 1}, dynamic=False)
    sequential = export_onnx(model, (idx,), tmp_path / "seq.onnx", {"n_seq": 5}, dynamic=False)
    assert (matmuls(batched), matmuls(sequential)) == (8 * 1 + 1, 8 * 6 + 1)
    assert dims(onnx.load(str(batched)).graph.input) == [[2, 8]]
    sess = session(sequential)
    np.testing.assert_allclose(run(sess, idx)[0], model(idx).numpy(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="dimensions"):
        run(sess, idx[:1])


class Block(nn.Module):
    """x + W cat(x[..., :3], 2 x[..., 3:]): a cat of parts of different sizes inside each layer."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        return x + torch.tanh(self.linear(torch.cat([x[..., :3], 2 * x[..., 3:]], dim=-1)))


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@torch.no_grad()
def test_a_model_the_backend_rewrites_exports_with_dynamic_batch_and_length(tmp_path):
    torch.manual_seed(0)
    model = Stack().eval()
    sess = session(
        export_onnx(model, (torch.randn(2, 5, 8),), tmp_path / "blocks.onnx", {"iters": 3, "fallback": "error"})
    )
    for batch, length in SHAPES:
        x = torch.randn(batch, length, 8)
        np.testing.assert_allclose(run(sess, x)[0], model(x).numpy(), atol=1e-5, rtol=1e-5)


class OtherCacheGPT(GPT):
    def make_kv_cache(self, batch_size, max_seq_len, device, dtype):
        return [torch.zeros(batch_size, max_seq_len)]


def test_what_cannot_be_exported_is_refused_naming_the_option(tmp_path):
    model, idx = GPT(GPTConfig.preset("tiny")), torch.randint(0, 64, (1, 4))
    with pytest.raises(ValueError, match=r"training mode .* call model.eval\(\) first"):
        export_onnx(model, (idx,), tmp_path / "train.onnx")
    model.eval()
    with pytest.raises(ValueError, match="gemv=True routes linears through snlp::linear"):
        export_onnx(model, (idx,), tmp_path / "gemv.onnx", SNLPConfig(gemv=True))
    with pytest.raises(ValueError, match="must end in .onnx"):
        export_onnx(model, (idx,), tmp_path / "model.bin")
    with pytest.raises(ValueError, match="decode=True needs dynamic=True"):
        export_onnx(model, (idx,), tmp_path / "static.onnx", decode=True, dynamic=False)
    with pytest.raises(ValueError, match=r"decode=True takes one example input, the token ids \[B, T\]"):
        export_onnx(model, (idx, idx), tmp_path / "two.onnx", decode=True)
    with pytest.raises(TypeError, match="Sequential cannot be decoded: it has no vocab_size"):
        export_onnx(nn.Sequential(Block()).eval(), (idx,), tmp_path / "seq.onnx", decode=True)
    with pytest.raises(ValueError, match=r"KV cache holds tensors k, v .* OtherCacheGPT.make_kv_cache returned"):
        export_onnx(OtherCacheGPT(GPTConfig.preset("tiny")).eval(), (idx,), tmp_path / "cache.onnx", decode=True)
    assert not list(tmp_path.iterdir())
