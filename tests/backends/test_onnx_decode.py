"""Decode-step ONNX export and onnx_generate: the prefill and decode files reproduce the model with a KV
cache, and greedy generation from them gives the torch model's tokens."""

import shutil

import numpy as np
import pytest
import torch

from snlp_compile import export_onnx, generate, onnx_generate
from snlp_compile.decoding.onnx_generate import decode_path
from snlp_compile.models import GPT, GPTConfig, StaticKVCache

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    """A 4-layer GPT and its files, traced on a one-token prompt, exact: layer 0 sequential, then a block of
    two layers (iters = 2) and a block of one (every way a layer writes its slice of the stacked cache)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", n_layer=4)).eval()
    path = tmp_path_factory.mktemp("onnx") / "gpt.onnx"
    config = {"n_seq": 1, "blocks": 2, "iters": 2, "fallback": "error"}
    export_onnx(model, (torch.randint(0, 64, (1, 1)),), path, config, decode=True)
    return model, path


def session(path):
    onnx.checker.check_model(str(path), full_check=True)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def shapes(values):
    return {v.name: v.shape for v in values}


def test_the_files_have_the_stacked_past_and_present_layout(exact):
    _, path = exact
    prefill, step = session(path), session(decode_path(path))
    assert decode_path(path).name == "gpt.decode.onnx"
    cache = [4, "batch", 4, "seq", 8]
    assert shapes(prefill.get_inputs()) == {"input_ids": ["batch", "seq"]}
    assert shapes(prefill.get_outputs()) == {
        "logits": ["batch", "seq", 64],
        "present_keys": cache,
        "present_values": cache,
    }
    past = [4, "batch", 4, "past", 8]
    assert shapes(step.get_inputs()) == {"input_ids": ["batch", "seq"], "past_keys": past, "past_values": past}
    assert [o.name for o in step.get_outputs()] == ["logits", "present_keys", "present_values"]
    meta = step.get_modelmeta().custom_metadata_map
    assert (meta["snlp_compile.max_seq_len"], meta["snlp_compile.vocab_size"]) == ("64", "64")


@torch.no_grad()
def test_prefill_and_decode_steps_match_the_model_and_its_cache(exact):
    model, path = exact
    prefill, step = session(path), session(decode_path(path))
    tokens = torch.randint(0, 64, (3, 10))
    full = model(tokens).numpy()
    cache = StaticKVCache(model.config, 3, 10)
    model(tokens, kv_cache=cache)
    logits, keys, values = prefill.run(None, {"input_ids": tokens[:, :6].numpy()})
    np.testing.assert_allclose(logits, full[:, :6], atol=1e-4, rtol=1e-4)
    for start, stop in ((6, 7), (7, 10)):  # one token, then three at once
        feed = {"input_ids": tokens[:, start:stop].numpy(), "past_keys": keys, "past_values": values}
        logits, keys, values = step.run(None, feed)
        np.testing.assert_allclose(logits, full[:, start:stop], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(keys, cache.k.numpy(), atol=1e-5)
    np.testing.assert_allclose(values, cache.v.numpy(), atol=1e-5)


def test_onnx_generate_gives_the_greedy_tokens_of_the_model(exact):
    model, path = exact
    prompt = torch.randint(0, 64, (3, 7))
    tokens = onnx_generate(path, prompt.numpy(), 20)
    assert tokens.dtype == np.int64 and tokens.shape == (3, 20)
    np.testing.assert_array_equal(tokens, generate(model, prompt, 20, mode="sequential").tokens[:, 7:].numpy())
    one_row = onnx_generate(path, prompt[0], 5)  # a [T] prompt is one row
    np.testing.assert_array_equal(one_row, tokens[:1, :5])


def test_onnx_generate_refuses_bad_arguments_naming_them(exact, tmp_path):
    _, path = exact
    prompt = np.zeros((1, 60), dtype=np.int64)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        onnx_generate(path, prompt, 0)
    with pytest.raises(ValueError, match=r"prompt length 60 \+ max_new_tokens 5 exceeds the model's context"):
        onnx_generate(path, prompt, 5)
    with pytest.raises(ValueError, match=r"token ids in \[0, vocab_size=64\)"):
        onnx_generate(path, prompt[:, :4] + 64, 1)
    with pytest.raises(ValueError, match="non-empty integer array"):
        onnx_generate(path, prompt.astype(np.float32), 1)
    shutil.copy(path, tmp_path / "alone.onnx")
    with pytest.raises(FileNotFoundError, match=r"alone.decode.onnx does not exist: write both files"):
        onnx_generate(tmp_path / "alone.onnx", prompt[:, :4], 1)
