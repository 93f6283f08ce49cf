"""SNLPRegularizer on tiny CPU models: its loss against independent references, its hooks, options and errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from snlp_compile import SNLPConfig
from snlp_compile.models import GPT, MHCGPT, GPTConfig, StaticKVCache
from snlp_compile.models.mhc import sinkhorn
from snlp_compile.training import SNLPRegularizer, relative_error
from snlp_compile.training.traced_stack import trace_stack

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap over CPU attention
IDX = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))


def tiny(cls=GPT, **overrides):
    model = cls(GPTConfig.preset("tiny", sequence_len=16, **overrides))
    if overrides.get("x0_mixing"):
        with torch.no_grad():
            model.resid_lambdas.copy_(torch.linspace(0.8, 1.2, 4))
            model.x0_lambdas.copy_(torch.linspace(0.3, -0.2, 4))
    return model


def test_finds_the_stack_the_compiler_finds():
    model = tiny()
    stack = trace_stack(model, (IDX,), {}, SNLPConfig(), "test")
    assert stack.blocks == list(model.blocks) and len(stack) == 4
    with pytest.raises(ValueError, match="test: the compiler finds no layer stack in Sequential"):
        trace_stack(nn.Sequential(nn.Linear(2, 2)), (torch.randn(1, 2),), {}, SNLPConfig(), "test")


def test_gradients_reach_the_right_parameters():
    model = tiny()
    reg = SNLPRegularizer(model, weight=1.0, n_par=2)
    model(IDX)
    reg.loss().backward()
    for block in model.blocks:  # parallel blocks through the solve, earlier ones through its start
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    assert model.wte.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad is None


@pytest.mark.parametrize("detach", [False, True])
def test_detached_target_gets_no_gradient(detach):
    model = tiny()
    reg = SNLPRegularizer(model, weight=1.0, n_par=2, detach_target=detach)
    model(IDX)
    reg.loss()  # the first loss traces the stack and hooks its layers: later forwards' traces are reused
    outputs = []
    model.blocks[-1].register_forward_hook(lambda m, a, out: outputs.append(out))
    model(IDX)
    grad = torch.autograd.grad(reg.loss(), outputs[0], allow_unused=True)[0]
    assert (grad is None) == detach


def test_warmup_schedule():
    model = tiny()
    reg = SNLPRegularizer(model, weight=0.8, warmup_steps=4)
    full = SNLPRegularizer(model, weight=0.8)
    weights = []
    for _ in range(6):
        weights.append(reg.current_weight)
        model(IDX)
        loss, reference = reg.loss(), full.loss()
        torch.testing.assert_close(loss, reference * weights[-1] / 0.8)
        reg.step()
    assert weights == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 0.8])


def test_idn_one_iteration_is_the_prefix_sum():
    """Independent reference: one IDN iteration from h0 gives h0 + sum_i (f_i(h0) - h0)."""
    model = tiny()
    reg = SNLPRegularizer(model, weight=1.0, n_par=3)
    model(IDX)
    loss = reg.loss()
    positions = torch.arange(16)
    cos, sin = model.cos[positions], model.sin[positions]
    h = model.blocks[0](F.rms_norm(model.wte(IDX), (32,)), cos, sin, positions)
    approx = h + sum(model.blocks[i](h, cos, sin, positions) - h for i in (1, 2, 3))
    exact = h
    for i in (1, 2, 3):
        exact = model.blocks[i](exact, cos, sin, positions)
    expected = ((approx - exact).norm(dim=-1) / exact.norm(dim=-1)).mean()  # per token [B, T]
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("cls, overrides", [(GPT, {}), (GPT, dict(x0_mixing=True)), (MHCGPT, dict(x0_mixing=True))])
def test_exact_when_iters_reach_n_par(cls, overrides):
    model = tiny(cls, **overrides)
    model(IDX)  # a forward before the hooks exist is not captured
    exact = SNLPRegularizer(model, weight=1.0, n_par=(2, 4), iters=4, stride=1)
    batch_fwd = SNLPRegularizer(model, weight=1.0, n_par=(2, 4), iters=3, init="batch_fwd", stride=1)
    one = SNLPRegularizer(model, weight=1.0, n_par=(2, 4))
    model(IDX)
    assert exact.loss().item() == 0.0  # skipped: exact by the solver's invariant
    assert batch_fwd.loss().item() < 1e-5  # computed: exact after n_par - 1 iterations with batch_fwd
    assert one.loss().item() > 1e-3


def test_hcn_surrogate_on_hyper_connections():
    model = tiny(MHCGPT)
    stack = trace_stack(model, (IDX,), {}, SNLPConfig(), "test")
    hcn = SNLPRegularizer(model, weight=1.0, n_par=4)
    idn = SNLPRegularizer(model, weight=1.0, n_par=4, surrogate="identity")
    model(IDX)
    assert hcn.loss().item() != pytest.approx(idn.loss().item())
    _, inputs = stack.side_inputs(model, (IDX,), {})
    surrogate = stack.surrogate(inputs, 0)  # J_l = H_res(mlp) @ H_res(attn), in execution order
    assert surrogate.kind == "mix"
    for block, mix in zip(model.blocks, surrogate.values, strict=True):
        attn, mlp = block.hc_attn, block.hc_mlp
        expected = sinkhorn(mlp.res_logits, mlp.sinkhorn_iters) @ sinkhorn(attn.res_logits, attn.sinkhorn_iters)
        torch.testing.assert_close(mix, expected)
    reg = SNLPRegularizer(tiny(), surrogate="hc")
    reg.model(IDX)
    with pytest.raises(ValueError, match="stream mixing"):
        reg.loss()


def test_weight_zero_costs_nothing():
    model = tiny()
    reg = SNLPRegularizer(model, weight=0.0)
    assert not model._forward_pre_hooks and all(not block._forward_hooks for block in model.blocks)
    model(IDX)
    loss = reg.loss()
    assert loss.item() == 0.0 and not loss.requires_grad


def test_remove_takes_the_hooks_off():
    model = tiny()
    reg = SNLPRegularizer(model)
    model(IDX)
    reg.loss()  # traces the stack and hooks its layers
    assert model._forward_pre_hooks and all(block._forward_hooks for block in model.blocks)
    reg.remove()
    assert not model._forward_pre_hooks and all(not block._forward_hooks for block in model.blocks)


def test_context_form_refers_to_the_forward_inside():
    model = tiny()
    reg = SNLPRegularizer(model, weight=1.0)
    model(IDX)
    with reg:
        pass
    with pytest.raises(RuntimeError, match="no forward of the model was captured"):
        reg.loss()
    with reg:
        model(IDX)
    assert reg.loss().item() > 0
    with pytest.raises(RuntimeError, match="no forward of the model was captured"):
        reg.loss()  # one forward, one loss


def test_autocast_state_of_the_forward_is_used_and_accumulation_adds_up():
    model = tiny()
    reg = SNLPRegularizer(model, weight=1.0)
    model(IDX)
    fp32 = reg.loss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(IDX)
    bf16 = reg.loss()  # computed outside the context, under the forward's bf16 autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(IDX)
        inside = reg.loss()
    torch.testing.assert_close(bf16, inside)
    assert bf16.item() != fp32.item() and bf16.item() == pytest.approx(fp32.item(), rel=0.1)
    grads = []
    for chunks in (1, 2):  # gradient accumulation: one forward, one loss per micro-batch
        model.zero_grad()
        for x in IDX.chunk(chunks):
            model(x)
            (reg.loss() * x.shape[0] / IDX.shape[0]).backward()
        grads.append(model.blocks[-1].mlp.c_fc.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])  # R is a mean over tokens: equal chunks add up


def _ddp_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One DistributedDataParallel rank (gloo, CPU): its half of IDX, task loss + regulariser, one backward."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = tiny()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        reg = SNLPRegularizer(model, weight=1.0, n_par=(2, 4))  # the module, not the DDP wrapper
        x = IDX.chunk(world)[rank]
        (ddp(x).square().mean() + reg.loss()).backward()
        torch.save([p.grad for p in model.parameters()], f"{out_dir}/grads{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_data_parallel(tmp_path):
    """Under DDP (two CPU ranks, gloo) the regulariser's gradients are all-reduced with the task's:
    every rank ends with the mean of the single-process gradients of the two halves."""
    world = 2
    torch.multiprocessing.spawn(_ddp_rank, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    reduced = [torch.load(tmp_path / f"grads{r}.pt") for r in range(world)]
    torch.manual_seed(0)
    model = tiny()
    reg = SNLPRegularizer(model, weight=1.0, n_par=(2, 4))
    for x in IDX.chunk(world):
        (model(x).square().mean() + reg.loss()).backward()  # gradients add up over the halves
    for name, p, a, b in zip(dict(model.named_parameters()), model.parameters(), *reduced, strict=True):
        torch.testing.assert_close(a, b, msg=name)
        torch.testing.assert_close(a, p.grad / world, msg=name)


def test_hooks_fire_inside_a_compiled_model():
    model = tiny()
    reg = SNLPRegularizer(model, weight=1.0)
    grads = []
    for forward in (model, torch.compile(model, backend="eager")):
        model.zero_grad()
        (forward(IDX).square().mean() + reg.loss()).backward()
        grads.append([p.grad for p in model.blocks.parameters()])
    for eager, compiled in zip(*grads, strict=True):
        torch.testing.assert_close(compiled, eager)


def test_any_glue_between_blocks_belongs_to_the_layer_after_it():
    """Glue the parent's loop applies (here a scale and a shift) is part of the next layer's function,
    as the compiler sees it, and so is the scaled-identity surrogate it implies."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            return x + torch.tanh(self.linear(x))

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Residual() for _ in range(3)])

        def forward(self, x):
            for block in self.blocks:
                x = block(0.5 * x + 1.0)
            return x

    model, x = Scaled(), torch.randn(2, 4)
    reg = SNLPRegularizer(model, weight=1.0, n_par=2)
    model(x)
    loss = reg.loss()
    f = [lambda h, b=b: b(0.5 * h + 1.0) for b in model.blocks]
    h0 = f[0](x)
    # the skip path of a layer scales its input by 0.5: the surrogate J = 0.5 I, as the compiler reads it
    approx, exact = f[2](h0) + 0.5 * (f[1](h0) - h0), f[2](f[1](h0))
    torch.testing.assert_close(loss, ((approx - exact).norm(dim=-1) / exact.norm(dim=-1)).mean())


def test_kv_cache_is_an_error():
    model = tiny()
    reg = SNLPRegularizer(model)
    model(IDX, kv_cache=StaticKVCache(model.config, batch_size=2))
    with pytest.raises(ValueError, match="KV cache"):
        reg.loss()


def test_several_iteration_counts_average_their_terms():
    """iters=(1, 2): the mean over every (n_par, K) pair; pairs with K >= n_par count as exact zeros."""
    model = tiny()
    regs = {k: SNLPRegularizer(model, weight=1.0, n_par=(2, 4), iters=k) for k in (1, 2, (1, 2))}
    model(IDX)
    losses = {k: reg.loss() for k, reg in regs.items()}
    torch.testing.assert_close(losses[(1, 2)], (losses[1] + losses[2]) / 2)
    assert losses[1] > losses[2] > 0  # K = 2 is exact for n_par = 2 only: its n_par = 4 term remains


def test_iteration_counts_per_n_par_average_only_their_own_terms():
    """iters={2: 1, 4: 2}: the terms (n_par 2, K 1) and (n_par 4, K 2) only, averaged; the keys are the n_par."""
    model = tiny()
    regs = {n: SNLPRegularizer(model, weight=1.0, n_par=n, iters=k) for n, k in ((2, 1), (4, 2))}
    regs["pairs"] = SNLPRegularizer(model, weight=1.0, iters={2: 1, 4: [2]})
    regs["twice"] = SNLPRegularizer(model, weight=1.0, n_par=(2, 2), iters=1)  # a mean: repeats change nothing
    model(IDX)
    losses = {key: reg.loss() for key, reg in regs.items()}
    torch.testing.assert_close(losses["pairs"], (losses[2] + losses[4]) / 2)
    torch.testing.assert_close(losses["twice"], losses[2])
    assert regs["pairs"].n_par == (2, 4)
    with pytest.raises(ValueError, match=r"iters' keys \[2, 4\] must be the n_par values, got 3"):
        SNLPRegularizer(model, n_par=3, iters={2: 1, 4: 2})
    with pytest.raises(ValueError, match=r"iters\[4\] must be one or more integers >= 1, got 0"):
        SNLPRegularizer(model, iters={2: 1, 4: 0})


@pytest.mark.parametrize("cls", [GPT, MHCGPT], ids=["gpt", "mhc"])
def test_checkpointed_solves_give_the_same_loss_and_gradients(cls):
    """checkpoint=True recomputes the solves in backward: same loss and gradients, a small fraction of
    the saved activations, and the recomputation's block calls are not captured as a forward."""
    model = tiny(cls)
    grads, kept = {}, {}
    for checkpoint in (False, True):
        saved = []
        reg = SNLPRegularizer(model, weight=1.0, n_par=(2, 4), iters=(1, 2), checkpoint=checkpoint)
        model.zero_grad()
        model(IDX)
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t.numel()) or t, lambda t: t):
            loss = reg.loss()  # `saved` counts the elements autograd keeps for backward
        loss.backward()
        assert reg._forward is None  # nothing captured during the backward's recomputation
        kept[checkpoint] = sum(saved)
        grads[checkpoint] = (loss.detach(), [p.grad.clone() for p in model.blocks.parameters()])
        reg.remove()
    assert kept[True] < kept[False] / 10  # the solves' activations are recomputed, not kept
    torch.testing.assert_close(grads[True][0], grads[False][0])
    for with_checkpoint, without in zip(grads[True][1], grads[False][1], strict=True):
        torch.testing.assert_close(with_checkpoint, without)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(weight=-1.0), "weight"),
        (dict(n_par=(0, 2)), "n_par"),
        (dict(n_par=2, stride=3), "stride"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(iters=0), "iters"),
        (dict(iters=()), "iters"),
        (dict(iters=(1, True)), "iters"),
        (dict(iters=1.5), "iters"),
        (dict(init="zeros"), "init"),
        (dict(checkpoint="yes"), "checkpoint"),
    ],
)
def test_invalid_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SNLPRegularizer(tiny(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_par=2.0), r"n_par must be one or more integers >= 1, got 2.0"),
        (dict(n_par=(2, 2.5)), r"n_par must be one or more integers >= 1"),
        (dict(iters=2.0), r"iters must be one or more integers >= 1, got 2.0"),
        (dict(n_par=2, stride=2.0), r"stride must be an integer in \[0, 2\], got 2.0"),
        (dict(warmup_steps=True), r"warmup_steps must be an integer >= 0, got True"),
        (dict(weight=float("inf")), r"weight must be a finite number >= 0, got inf"),
        (dict(weight=float("nan")), r"weight must be a finite number >= 0, got nan"),
    ],
)
def test_invalid_arguments_say_the_valid_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SNLPRegularizer(tiny(), **kwargs)


def test_n_par_beyond_the_stack_is_refused_at_the_first_loss():
    model = tiny()
    reg = SNLPRegularizer(model, n_par=5)
    model(IDX)
    with pytest.raises(
        ValueError, match=r"n_par must be one or more integers in \[1, 4\] \(the layers of blocks\), got \(5,\)"
    ):
        reg.loss()


def test_blocks_that_draw_random_numbers_are_refused():
    """Each Newton iteration would draw new dropout masks, so the SNLP trace cannot be compared with
    the forward's: loss() says so instead of returning a noisy number; dropout in eval mode is fine."""

    class Noisy(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.linear, self.drop = nn.Linear(8, 8), nn.Dropout(p)

        def forward(self, x):
            return x + self.drop(torch.tanh(self.linear(x)))

    class Net(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.blocks = nn.ModuleList([Noisy(p) for _ in range(4)])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    x = torch.randn(2, 3, 8)
    net = Net(0.1)
    reg = SNLPRegularizer(net, n_par=4)
    net(x)
    with pytest.raises(ValueError, match=r"draws random numbers \(dropout"):
        reg.loss()
    net.eval()
    net(x)
    assert reg.loss() > 0
    reg = SNLPRegularizer(Net(0.0), n_par=4)
    reg.model(x)
    assert reg.loss() > 0


def _train(weight: float, steps: int = 20) -> GPT:
    torch.manual_seed(0)
    model = tiny()
    reg = SNLPRegularizer(model, weight=weight, n_par=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        start = torch.randint(0, 48, (4, 1), generator=generator)
        idx = (start + torch.arange(17)) % 64  # counting sequences: learnable in a few steps
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()) + reg.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    reg.remove()
    return model.eval()


@torch.no_grad()
def _snlp_gap(model: GPT) -> float:
    """Relative logit error of the snlp backend (all layers parallel, K = 1) against sequential."""
    options = dict(iters=1, inner="eager", fallback="error")
    snlp = torch.compile(model, backend="snlp", options=options)(IDX)
    sequential = model(IDX)
    return ((snlp - sequential).norm() / sequential.norm()).item()


def test_regularised_training_has_the_smaller_snlp_gap():
    baseline, regularised = _train(0.0), _train(1.0)
    assert _snlp_gap(regularised) < 0.8 * _snlp_gap(baseline)


def test_relative_error_weighs_every_token_equally():
    """A token with massive activations must not hide the error of the others (per-token norms)."""
    target = torch.zeros(1, 2, 4)
    target[0, 0, 0], target[0, 1, 1] = 1000.0, 1.0
    approx = target.clone()
    approx[0, 1, 1] = 0.0  # the small token is entirely wrong, the large one exact
    assert relative_error(approx, target).item() == pytest.approx(0.5)
    streams = torch.randn(2, 3, 4, 8)  # MHC state [B, T, M, d]: one vector per token over streams and width
    assert relative_error(2 * streams, streams).item() == pytest.approx(1.0)


@pytest.mark.parametrize("use_cache", [False, True])
def test_a_hugging_face_llama_is_regularised(use_cache):
    """Found by the same analysis as the backend's: with the default DynamicCache too (its keys and
    values are side outputs of the layers, dropped by the solve the loss compares)."""
    pytest.importorskip("transformers")
    from tests.helpers.huggingface import llama

    torch.manual_seed(0)
    model = llama()
    reg = SNLPRegularizer(model, weight=1.0, n_par=4)
    idx = torch.randint(1, 64, (2, 8))
    model(idx, use_cache=use_cache)
    loss = reg.loss()
    assert loss.item() > 0
    loss.backward()
    assert all(layer.mlp.down_proj.weight.grad.abs().sum() > 0 for layer in model.model.layers)
