"""ONNX export of Hugging Face decoders called the ordinary way: one file with symbolic batch and length
holds the SNLP rewrite (the parallel layers as batched ops) and matches the torch rewrite, and the model
where the solve is exact; the default DynamicCache output is refused naming use_cache=False; with
decode=True the files decode on Hugging Face's cache and generate the model's greedy tokens."""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from snlp_compile import export_onnx, onnx_generate  # noqa: E402
from snlp_compile.decoding.onnx_generate import decode_path  # noqa: E402
from tests.helpers.huggingface import COMMON, gpt2, llama  # noqa: E402

N_LAYER = COMMON["num_hidden_layers"]  # gpt2() has as many
SHAPES = [(1, 1), (3, 17), (2, 40)]  # (batch, length): none is the traced (2, 12)
NO_CACHE = {"use_cache": False}


def session(path):
    onnx.checker.check_model(str(path), full_check=True)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def signature(sess):
    return [(v.name, v.shape) for v in sess.get_inputs()], [(v.name, v.shape) for v in sess.get_outputs()]


def matmul_weights(path) -> list[list[int]]:
    """The shape of the weight each MatMul of the file reads (an initializer); [] for products of activations."""
    graph = onnx.load(str(path)).graph
    weights = {w.name: list(w.dims) for w in graph.initializer}
    return [next((weights[i] for i in n.input if i in weights), []) for n in graph.node if n.op_type == "MatMul"]


def check_batched(path, model, iterations: int) -> None:
    """Per Newton iteration each linear (2-D weight) and the two attention products of all layers are one
    MatMul each, the linears' over the stacked weights [n_layer, ...]; only the LM head reads a weight of
    its own. Unrolled, the file would hold n_layer times as many per iteration."""
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))[0]
    weights = matmul_weights(path)
    assert len(weights) == iterations * (sum(p.dim() == 2 for p in layer.parameters()) + 2) + 1
    assert [w for w in weights if w and w[0] != N_LAYER] == [[COMMON["hidden_size"], COMMON["vocab_size"]]]


@pytest.fixture(scope="module", params=[llama, gpt2], ids=["llama", "gpt2"])
def approx(request, tmp_path_factory):
    """A model and its full-sequence file at iters=1."""
    torch.manual_seed(0)
    model = request.param().eval()
    path = tmp_path_factory.mktemp("hf") / "k1.onnx"
    return model, export_onnx(model, (torch.randint(1, 64, (2, 12)),), path, {"iters": 1}, kwargs=NO_CACHE)


@torch.no_grad()
def test_one_iteration_file_takes_any_batch_and_length_and_matches_the_torch_rewrite(approx):
    model, path = approx
    sess = session(path)
    assert signature(sess) == ([("input_ids", ["batch", "seq"])], [("logits", ["batch", "seq", 64])])
    check_batched(path, model, 1)
    compiled = torch.compile(model, backend="snlp", options={"iters": 1, "inner": "eager", "fallback": "error"})
    for batch, length in SHAPES:
        ids = torch.randint(1, 64, (batch, length))
        logits = sess.run(["logits"], {"input_ids": ids.numpy()})[0]
        np.testing.assert_allclose(logits, compiled(ids, use_cache=False).logits.numpy(), atol=1e-4, rtol=1e-4)
        assert np.abs(logits - model(ids, use_cache=False).logits.numpy()).max() > 1e-3  # an approximation


@pytest.mark.slow
@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama", "gpt2"])
@torch.no_grad()
def test_iterations_as_many_as_layers_are_batched_and_match_the_model(build, tmp_path):
    torch.manual_seed(0)
    model = build().eval()
    config = {"iters": N_LAYER, "fallback": "error"}
    path = export_onnx(model, (torch.randint(1, 64, (3, 5)),), tmp_path / "exact.onnx", config, kwargs=NO_CACHE)
    sess = session(path)
    assert signature(sess) == ([("input_ids", ["batch", "seq"])], [("logits", ["batch", "seq", 64])])
    check_batched(path, model, N_LAYER)
    for batch, length in SHAPES:
        ids = torch.randint(1, 64, (batch, length))
        expected = model(ids, use_cache=False).logits.numpy()
        np.testing.assert_allclose(sess.run(["logits"], {"input_ids": ids.numpy()})[0], expected, atol=1e-4, rtol=1e-4)


def test_what_cannot_be_exported_is_refused_naming_the_way_around(tmp_path):
    model, ids = llama().eval(), torch.randint(1, 64, (1, 4))
    with pytest.raises(ValueError, match=r"returns a DynamicCache at output\['cache'\].*kwargs=\{'use_cache': False\}"):
        export_onnx(model, (ids,), tmp_path / "cache.onnx")
    with pytest.raises(TypeError, match=r"kwargs are fixed in the file and \['attention_mask'\] hold tensors"):
        export_onnx(model, (ids,), tmp_path / "mask.onnx", kwargs={"attention_mask": torch.ones_like(ids)})
    with pytest.raises(ValueError, match=r"decode=True calls the model itself and takes no kwargs"):
        export_onnx(model, (ids,), tmp_path / "step.onnx", decode=True, kwargs=NO_CACHE)
    config = transformers.MistralConfig(**COMMON, sliding_window=4)
    sliding = transformers.MistralForCausalLM(config).eval()
    with pytest.raises(ValueError, match=r"DynamicCache of DynamicLayers .* a DynamicCache of \['Dynamic\w*Sliding"):
        export_onnx(sliding, (ids,), tmp_path / "sliding.onnx", decode=True)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@torch.no_grad()
def test_decode_files_on_the_huggingface_cache_generate_the_model_tokens(tmp_path):
    """Llama (GQA), exact: one sequential layer, then two Newton blocks of two layers at iters=2. The prefill
    and decode steps give the model's logits and DynamicCache tensors; onnx_generate its greedy tokens."""
    torch.manual_seed(0)
    model = llama().eval()
    config = {"n_seq": 1, "blocks": 2, "iters": 2, "fallback": "error"}
    path = export_onnx(model, (torch.randint(1, 64, (1, 1)),), tmp_path / "llama.onnx", config, decode=True)
    prefill, step = session(path), session(decode_path(path))
    cache = [N_LAYER, "batch", COMMON["num_key_value_heads"], "past", 8]
    assert signature(step)[0] == [("input_ids", ["batch", "seq"]), ("past_keys", cache), ("past_values", cache)]
    tokens = torch.randint(1, 64, (3, 10))
    out = model(tokens)
    keys, values = (torch.stack([getattr(layer, kind) for layer in out.cache.layers]) for kind in ("keys", "values"))
    logits, past_keys, past_values = prefill.run(None, {"input_ids": tokens[:, :6].numpy()})
    np.testing.assert_allclose(logits, out.logits[:, :6].numpy(), atol=1e-4, rtol=1e-4)
    for start, stop in ((6, 7), (7, 10)):  # one token, then three at once
        feed = {"input_ids": tokens[:, start:stop].numpy(), "past_keys": past_keys, "past_values": past_values}
        logits, past_keys, past_values = step.run(None, feed)
        np.testing.assert_allclose(logits, out.logits[:, start:stop].numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(past_keys, keys.numpy(), atol=1e-5)
    np.testing.assert_allclose(past_values, values.numpy(), atol=1e-5)
    model.generation_config.eos_token_id = None  # all 16 tokens, as onnx_generate gives them
    prompt = torch.randint(1, 64, (2, 7))
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    np.testing.assert_array_equal(onnx_generate(path, prompt.numpy(), 16), expected[:, 7:].numpy())


@pytest.mark.slow
@torch.no_grad()
def test_one_iteration_decodes_as_the_torch_snlp_decode(tmp_path):
    """GPT-2 at iters=1, prefill and decode steps both approximate: onnx_generate gives the greedy tokens of
    the model's generate() with its forward compiled by the snlp backend on the same options."""
    torch.manual_seed(0)
    model = gpt2().eval()
    model.generation_config.eos_token_id = None  # all 12 tokens, as onnx_generate gives them
    config = {"iters": 1, "inner": "eager", "fallback": "error"}
    path = export_onnx(model, (torch.randint(1, 64, (2, 3)),), tmp_path / "k1.onnx", config, decode=True)
    prompt = torch.randint(1, 64, (2, 7))
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    tokens = onnx_generate(path, prompt.numpy(), 12)
    model.forward = torch.compile(model.forward, backend="snlp", options=config)
    try:
        snlp = model.generate(prompt, **kwargs)[:, 7:].numpy()
    finally:
        del model.forward  # the class's forward again
    np.testing.assert_array_equal(tokens, snlp)
    logits = session(path).run(["logits"], {"input_ids": prompt.numpy()})[0]
    assert np.abs(logits - model(prompt).logits.numpy()).max() > 1e-3  # one iteration is an approximation
