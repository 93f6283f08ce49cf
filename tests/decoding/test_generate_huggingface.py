"""snlp_compile.generate on Hugging Face causal LMs, through their decoder (a transformers StaticCache):
greedy tokens equal model.generate(do_sample=False) in every mode where they must."""

import gc
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers")

from snlp_compile import SNLPConfig, generate  # noqa: E402
from snlp_compile.decoding.hf_decoder import hf_decoder  # noqa: E402
from tests.helpers.huggingface import gpt2, llama  # noqa: E402

NEW = 8
EXACT = SNLPConfig(iters=4, inner="eager", fallback="error")  # iters = L, prompt prefilled by SNLP too
CHEAP = SNLPConfig(iters=1, inner="eager", fallback="error")


@pytest.fixture(autouse=True)
def no_silent_eager():
    """A compiled forward that hits dynamo's recompile limit must fail, not silently run eagerly."""
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield


@pytest.mark.parametrize("build", [llama, gpt2])
@torch.no_grad()
def test_greedy_tokens_are_hugging_faces(build):
    torch.manual_seed(0)
    model = build().eval()
    prompt = torch.randint(1, 64, (2, 7))
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for mode, config in (("sequential", None), ("snlp", EXACT), ("speculative", CHEAP)):
        out = generate(model, prompt, NEW, config=config, mode=mode)
        assert torch.equal(out.tokens, expected), mode
    assert out.stats.drafted > 0  # the speculative run drafted with the SNLP solve and rewound its cache
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@torch.no_grad()
def test_one_iteration_drafts_are_approximate_and_the_output_exact():
    torch.manual_seed(0)
    model = llama().eval()
    prompt = torch.randint(1, 64, (1, 5))
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False)
    out = generate(model, prompt, NEW, config=CHEAP, mode="speculative", draft_len=3)
    assert torch.equal(out.tokens, expected)
    assert 0 < out.stats.accepted < out.stats.drafted  # some drafts rejected: the cache was rewound past them


def test_one_decoder_per_model_that_does_not_keep_it_alive():
    model = llama().eval()
    decoder = hf_decoder(model)
    assert hf_decoder(model) is decoder and decoder.vocab_size == 64 and decoder.max_seq_len == 64
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_a_cache_of_another_model_is_refused():
    model, other = llama().eval(), llama().eval()
    cache = hf_decoder(other).make_kv_cache(1, 16, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="built for another model"):
        generate(model, torch.tensor([[1, 2, 3]]), 4, mode="sequential", kv_cache=cache)
    with pytest.raises(ValueError, match="max_new_tokens must be <= 4"):
        generate(model, torch.ones(1, 60, dtype=torch.long), 5, mode="sequential")  # max_position_embeddings 64
