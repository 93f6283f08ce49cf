"""depth_parallel in this process (a one-rank gloo group): the solve, the memory it holds, its caches and errors."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from snlp_compile import SNLPConfig, generate
from snlp_compile.distributed import LocalKVCache, depth_parallel
from snlp_compile.models import GPT, MHCGPT, GPTConfig, StaticKVCache
from tests.distributed.workers import held_parameters
from tests.helpers.reference import solver_logits

IDX = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model(cls=GPT, **overrides) -> nn.Module:
    return cls(GPTConfig.preset("tiny", sinkhorn_iters=4, **overrides)).eval()


@pytest.mark.parametrize("cls", [GPT, MHCGPT])
def test_one_rank_is_the_single_process_solve_forward_and_decode(one_rank, cls):
    model, config = _model(cls), SNLPConfig(iters=2, n_seq=1)
    dp = depth_parallel(model, config)
    assert dp.world_size == 1 and dp.parallel_layers == [1, 2, 3] and dp.layers == [0, 1, 2, 3]
    with torch.no_grad():
        torch.testing.assert_close(dp(IDX), solver_logits(model, IDX, config), rtol=1e-5, atol=1e-5)
        cache, reference = dp.make_kv_cache(2, 8, "cpu", torch.float32), StaticKVCache(model.config, 2, 8)
        for t in (IDX[:, :5], IDX[:, 5:]):
            torch.testing.assert_close(dp(t, kv_cache=cache), solver_logits(model, t, config, reference))
    torch.testing.assert_close(cache.k, reference.k)  # the same keys, written by the same evaluations
    assert int(cache.pos) == 6


def test_shares_the_kept_tensors_or_copies_them_to_a_device_and_never_changes_the_model(one_rank):
    model = _model(x0_mixing=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shared = depth_parallel(model, {"iters": 1})
    assert {id(p) for p in shared.parameters()} == held_parameters(model, shared.layers)
    copied = depth_parallel(model, {"iters": 1}, device="cpu")
    model_storage = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not model_storage & {p.untyped_storage().data_ptr() for p in copied.parameters()}
    torch.testing.assert_close(copied(IDX), shared(IDX), rtol=0, atol=0)
    assert not copied(IDX).requires_grad  # inference only
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert len(model.blocks) == 4 and all(p.device.type == "cpu" for p in model.parameters())
    assert all(m.training for m in model.modules())  # its mode too


def test_caches_hold_the_ranks_layers_and_generate_uses_them(one_rank):
    model = _model()
    dp = depth_parallel(model, {"iters": 4})  # exact: generates the sequential tokens
    cache = dp.make_kv_cache(1, 10, "cpu", torch.float32)
    assert isinstance(cache, LocalKVCache) and cache.geometry == dp.kv_cache_geometry
    assert cache.geometry["n_layer"] == len(dp.layers)
    prompt = IDX[:1, :4]
    tokens = generate(dp, prompt, 5, mode="sequential").tokens
    assert torch.equal(tokens, generate(model, prompt, 5, mode="sequential").tokens)
    with pytest.raises(ValueError, match="built for another model"):
        generate(dp, prompt, 5, mode="sequential", kv_cache=StaticKVCache(GPTConfig.preset("tiny", n_layer=5), 1, 10))
    held = LocalKVCache(model.config, [0, 2], 1, 4)
    with pytest.raises(IndexError, match="holds layers \\[0, 2\\], not layer 1"):
        held.update(1, torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8), torch.zeros(1, dtype=torch.long))


def test_models_and_configurations_it_cannot_split_are_clear_errors(one_rank):
    with pytest.raises(TypeError, match="snlp_compile.models decoder"):
        depth_parallel(nn.Linear(4, 4), {})
    with pytest.raises(ValueError, match="surrogate='hc' needs stream mixing"):
        depth_parallel(_model(), {"surrogate": "hc"})
    with pytest.raises(ValueError, match="blocks must be 1"):
        depth_parallel(_model(), {"blocks": 2})


def test_without_a_process_group_it_says_how_to_start_one():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        depth_parallel(_model(), {})
