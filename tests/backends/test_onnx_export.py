"""ONNX parity: onnxruntime runs the rewritten graph and matches PyTorch."""

import warnings

import numpy as np
import pytest
import torch

from snlp_compile import export_onnx, snlp_transform
from snlp_compile.models import GPT, MHCGPT, GPTConfig

ort = pytest.importorskip("onnxruntime")


def run_onnx(path, idx):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: idx.numpy()})[0]


@pytest.mark.parametrize("cls", [GPT, MHCGPT])
def test_onnx_matches_the_rewritten_graph_and_the_model(cls, tmp_path):
    model = cls(GPTConfig.preset("tiny", n_layer=3, sinkhorn_iters=4)).eval()
    idx = torch.randint(0, 64, (1, 12))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="Exporting a model while it is in training mode")  # it is not
        expected = model(idx).numpy()
        exact = run_onnx(export_onnx(model, (idx,), tmp_path / "exact.onnx", {"iters": 3}), idx)
        np.testing.assert_allclose(exact, expected, atol=1e-4, rtol=1e-4)
        cheap = run_onnx(export_onnx(model, (idx,), tmp_path / "cheap.onnx", {"iters": 1}), idx)
        rewritten = snlp_transform(torch.export.export(model, (idx,)).module(), (idx,), {"iters": 1})(idx).numpy()
    np.testing.assert_allclose(cheap, rewritten, atol=1e-4, rtol=1e-4)
    assert np.abs(cheap - expected).max() > 1e-3  # one iteration is the approximate regime


def test_bad_path(tmp_path):
    model = GPT(GPTConfig.preset("tiny")).eval()
    with pytest.raises(ValueError, match="must end in .onnx"):
        export_onnx(model, (torch.randint(0, 64, (1, 4)),), tmp_path / "model.bin")
