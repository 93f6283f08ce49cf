"""onnx_generate against torch decoding: the approximate regime (K=1) decodes as the snlp backend does, and
the unrewritten files as the model."""

import numpy as np
import pytest
import torch

from snlp_compile import export_onnx, generate, onnx_generate
from snlp_compile.decoding.onnx_generate import decode_path
from snlp_compile.models import GPT, GPTConfig

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@torch.no_grad()
def test_one_iteration_decodes_as_the_torch_snlp_decode(tmp_path):
    """iters=1 with a sequential prefill: the approximate decode steps give the greedy tokens of
    `generate(mode="snlp")`, the same solve run by the snlp backend."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", n_layer=2)).eval()
    config = {"iters": 1, "prefill": "sequential", "inner": "eager", "fallback": "error"}
    path = export_onnx(model, (torch.randint(0, 64, (2, 3)),), tmp_path / "k1.onnx", config, decode=True)
    prompt = torch.randint(0, 64, (2, 5))
    tokens = onnx_generate(path, prompt, 12)
    snlp = generate(model, prompt, 12, config, mode="snlp").tokens[:, 5:].numpy()
    np.testing.assert_array_equal(tokens, snlp)
    assert (tokens != generate(model, prompt, 12, mode="sequential").tokens[:, 5:].numpy()).any()


@torch.no_grad()
def test_the_unrewritten_files_decode_as_the_model(tmp_path):
    """rewrite=False: the sequential model in the same layout (one cache tensor per layer inside)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", n_layer=2)).eval()
    path = export_onnx(model, (torch.randint(0, 64, (2, 3)),), tmp_path / "seq.onnx", decode=True, rewrite=False)
    assert sum(n.op_type == "MatMul" for n in onnx.load(str(decode_path(path))).graph.node) == 8 * 2 + 1
    prompt = torch.randint(0, 64, (2, 5))
    expected = generate(model, prompt, 12, mode="sequential").tokens[:, 5:].numpy()
    np.testing.assert_array_equal(onnx_generate(path, prompt, 12), expected)
