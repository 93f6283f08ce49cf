"""Decoding through the cache protocol: a model of another shape, with a cache of its own, decodes."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import snlp_compile.decoding
from snlp_compile import SNLPConfig, generate, stream
from snlp_compile.models import GPT, GPTConfig, StaticKVCache
from tests.helpers.imports import imported_modules

N_LAYER, WIDTH, HEADS, VOCAB, CONTEXT = 3, 16, 2, 32, 24
EXACT = SNLPConfig(iters=N_LAYER, inner="eager", fallback="error", prefill="sequential")  # iters = n_layer


class ForeignCache:
    """Keys and values [layers, batch, positions, width] (heads not split) and a `length` counter;
    no base class, and none of StaticKVCache's other members (pos, check, rollback, update)."""

    def __init__(self, layers: int, batch: int, positions: int, width: int, device, dtype) -> None:
        self.keys = torch.zeros(layers, batch, positions, width, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.length = torch.zeros((), dtype=torch.int64, device=device)

    batch_size = property(lambda self: self.keys.size(1))
    max_seq_len = property(lambda self: self.keys.size(2))
    device = property(lambda self: self.keys.device)
    geometry = property(lambda self: {"layers": self.keys.size(0), "width": self.keys.size(3)})

    def reset(self) -> None:
        self.length.zero_()

    def rewind(self, n_positions: int) -> None:
        self.length.sub_(n_positions)


class ForeignLayer(nn.Module):
    """Pre-norm attention over the cache (written with a plain index_copy_) and a GELU MLP."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))

    def forward(self, x: Tensor, positions: Tensor, cache: ForeignCache) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(F.rms_norm(x, (WIDTH,))).chunk(3, dim=-1)
        keys, values = cache.keys[self.index], cache.values[self.index]
        keys.index_copy_(1, positions, k)
        values.index_copy_(1, positions, v)
        S = keys.size(1)
        heads = [t.view(B, -1, HEADS, WIDTH // HEADS).transpose(1, 2) for t in (q, keys, values)]
        mask = torch.arange(S, device=x.device) <= positions[:, None]  # [T, S]: filled and not in the future
        y = F.scaled_dot_product_attention(*heads, attn_mask=mask).transpose(1, 2).reshape(B, T, WIDTH)
        x = x + self.proj(y)
        return x + self.mlp(F.rms_norm(x, (WIDTH,)))


class ForeignDecoder(nn.Module):
    """A decoder unlike snlp_compile.models (no config, plain attributes for its limits), with its own cache."""

    vocab_size, max_seq_len, kv_cache_geometry = VOCAB, CONTEXT, {"layers": N_LAYER, "width": WIDTH}

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList(ForeignLayer(i) for i in range(N_LAYER))
        self.head = nn.Linear(WIDTH, VOCAB)

    def make_kv_cache(self, batch_size: int, max_seq_len: int, device, dtype) -> ForeignCache:
        return ForeignCache(N_LAYER, batch_size, max_seq_len, WIDTH, device, dtype)

    def forward(self, idx: Tensor, kv_cache: ForeignCache) -> Tensor:
        positions = kv_cache.length + torch.arange(idx.size(1), device=idx.device)
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x, positions, kv_cache)
        kv_cache.length.add_(idx.size(1))
        return self.head(F.rms_norm(x, (WIDTH,)))


@pytest.fixture(scope="module")
def foreign() -> ForeignDecoder:
    torch.manual_seed(0)
    return ForeignDecoder().eval()


def _prompt() -> Tensor:
    return torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))


def test_a_foreign_model_with_its_own_cache_decodes_in_every_mode(foreign):
    """Sequential decoding equals decoding by hand with the model's own forward; SNLP at iters =
    n_layer (fallback="error": the rewrite really ran) and speculative decoding give the same tokens."""
    prompt, new = _prompt(), 6
    sequential = generate(foreign, prompt, new, mode="sequential").tokens
    cache, tokens = foreign.make_kv_cache(2, CONTEXT, "cpu", torch.float32), prompt
    with torch.no_grad():
        logits = foreign(prompt, kv_cache=cache)
        for _ in range(new):
            tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
            logits = foreign(tokens[:, -1:], kv_cache=cache)
    assert torch.equal(sequential, tokens)
    snlp_cache = foreign.make_kv_cache(2, CONTEXT, "cpu", torch.float32)
    snlp = generate(foreign, prompt, new, config=EXACT, mode="snlp", kv_cache=snlp_cache)
    assert torch.equal(snlp.tokens, sequential)
    assert int(snlp_cache.length) == prompt.size(1) + new - 1
    speculative = generate(foreign, prompt, new, config=EXACT, mode="speculative", draft_len=2)
    assert torch.equal(speculative.tokens, sequential) and speculative.stats.drafted > 0


class NoFactory(nn.Module):
    def forward(self, idx: Tensor, kv_cache=None) -> Tensor:
        return torch.zeros(*idx.shape, 4)


class NoMakeKVCache(NoFactory):
    vocab_size, max_seq_len, kv_cache_geometry = 4, 8, {}


@pytest.mark.parametrize(
    "model,missing",
    [(NoFactory, "vocab_size, max_seq_len, kv_cache_geometry, make_kv_cache"), (NoMakeKVCache, "make_kv_cache")],
)
def test_a_model_without_a_cache_factory_is_a_type_error_naming_what_it_lacks(model, missing):
    with pytest.raises(TypeError, match=f"{model.__name__} cannot be decoded: it has no {missing} "):
        stream(model(), torch.tensor([1, 2]), 2, mode="sequential")


def test_a_cache_without_a_protocol_member_is_a_type_error_naming_it(foreign):
    cache = foreign.make_kv_cache(1, CONTEXT, "cpu", torch.float32)
    members = ("batch_size", "max_seq_len", "device", "geometry", "reset")
    no_rewind = SimpleNamespace(**{name: getattr(cache, name) for name in members})
    with pytest.raises(TypeError, match="kv_cache of type SimpleNamespace has no rewind "):
        stream(foreign, torch.tensor([1, 2]), 2, mode="sequential", kv_cache=no_rewind)


def test_a_cache_of_another_geometry_is_a_value_error_naming_both(foreign):
    cache = ForeignCache(N_LAYER - 1, 1, CONTEXT, WIDTH, "cpu", torch.float32)  # built for a model of 2 layers
    expected = r"another model: it has \{'layers': 2, 'width': 16\}, the model needs \{'layers': 3, 'width': 16\}"
    with pytest.raises(ValueError, match=expected):
        stream(foreign, torch.tensor([1, 2]), 2, mode="sequential", kv_cache=cache)


def test_the_built_in_model_and_cache_meet_the_protocols():
    model = GPT(GPTConfig.preset("tiny", n_kv_head=2))
    cache = model.make_kv_cache(2, 8, torch.device("cpu"), torch.float32)
    assert isinstance(cache, StaticKVCache) and cache.batch_size == 2 and cache.max_seq_len == 8
    assert cache.geometry == model.kv_cache_geometry == {"n_layer": 4, "n_kv_head": 2, "head_dim": 8}
    assert (model.vocab_size, model.max_seq_len) == (64, 64)


def test_decoding_imports_nothing_of_the_models():
    imports = imported_modules(snlp_compile.decoding)
    assert {"cache.py", "generate.py", "speculative.py"} <= set(imports)
    assert "snlp_compile.decoding.cache" in imports["generate.py"]  # relative imports are resolved
    models = {file: sorted(n for n in names if n.startswith("snlp_compile.models")) for file, names in imports.items()}
    assert not any(models.values()), models
