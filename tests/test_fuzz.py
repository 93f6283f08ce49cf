"""Randomised models: every one is either rewritten correctly or runs exactly as the model, in
outputs, gradients and module state."""

import contextlib
import copy
import logging
import random

import pytest
import torch
from torch import nn

from snlp_compile import SNLPConfig
from snlp_compile.models.mhc import sinkhorn
from snlp_compile.solver import schedule


class FuzzLayer(nn.Module):
    """`draw`: a state-independent random draw in every layer ("noise", a hand-made dropout "mask");
    `scratch`: a state-independent tensor changed in place before it is read; `index_add`: the branch
    added into a zeros buffer the layer allocates; `running_stats`: a functional batch norm in training
    mode that updates the layer's running-statistics buffers."""

    def __init__(
        self,
        width,
        streams,
        norm,
        gate,
        act,
        x0,
        draw=None,
        scratch=False,
        index_add=False,
        running_stats=False,
        mixing="matmul",
    ):
        super().__init__()
        self.norm, self.gate, self.x0, self.mixing = norm, gate, x0, mixing
        self.draw, self.scratch, self.index_add, self.running_stats = draw, scratch, index_add, running_stats
        if running_stats:
            self.register_buffer("running_mean", torch.zeros(width))
            self.register_buffer("running_var", torch.ones(width))
        self.lin = nn.Linear(width, width)
        self.act = act
        self.scale = nn.Parameter(torch.tensor(0.9)) if gate == "param" else None
        self.mix = nn.Parameter(torch.randn(streams, streams)) if streams > 1 else None
        self.mix_proj = nn.Linear(width, streams)  # the dynamic form's per-token mixing from the state

    def branch(self, x, side):
        if self.norm == "pre":
            x = nn.functional.layer_norm(x, x.shape[-1:])
        y = self.act(self.lin(x)) + 0.1 * side
        if self.draw == "noise":
            y = y + 0.1 * torch.randn(y.shape)
        elif self.draw == "mask":
            y = y * (torch.rand(y.shape) < 0.8) / 0.8
        if self.scratch:
            s = torch.ones(y.shape[-1])
            s.mul_(0.5)
            y = y * s
        if self.index_add:
            buf = torch.zeros(y.shape)
            buf.index_add_(-1, torch.arange(y.shape[-1] - 1, -1, -1), y)
            y = buf
        if self.running_stats:
            flat = nn.functional.batch_norm(
                y.reshape(-1, y.shape[-1]), self.running_mean, self.running_var, training=True
            )
            y = flat.reshape(y.shape)
        return nn.functional.layer_norm(y, y.shape[-1:]) if self.norm == "post" else y

    def forward(self, h, side, x0):
        if self.mix is not None:  # stream mixing as a matmul, an einsum, or per token from the state
            mix = sinkhorn(self.mix, 5)
            if self.mixing == "dynamic":
                mix = mix + 0.2 * torch.tanh(self.mix_proj(h))
            skip = torch.einsum("ij,btjd->btid", mix, h) if self.mixing == "einsum" else mix @ h
            return skip + 0.5 * self.branch(h.mean(-2), side).unsqueeze(-2)
        skip = h * self.scale if self.gate == "param" else (0.8 * h if self.gate == "const" else h)
        out = skip + 0.5 * self.branch(h, side)
        return out + 0.1 * x0 if self.x0 else out


class FuzzModel(nn.Module):
    def __init__(self, rng: random.Random):
        super().__init__()
        self.width, self.streams = rng.choice([8, 12]), rng.choice([1, 1, 3])
        depth = rng.randint(2, 6)
        acts = [nn.Tanh(), nn.GELU(), nn.SiLU()]
        self.hetero = hetero = rng.random() < 0.3
        common = dict(
            norm=rng.choice(["pre", "post", None]),
            gate=rng.choice(["param", "const", None]),
            x0=rng.random() < 0.3,
            draw=rng.choice([None, None, "noise", "mask"]),
            scratch=rng.random() < 0.3,
            index_add=rng.random() < 0.3,
            running_stats=rng.random() < 0.15,
            mixing=rng.choice(["matmul", "einsum", "dynamic"]),
        )
        self.layers = nn.ModuleList(
            [FuzzLayer(self.width, self.streams, act=acts[i % 2 if hetero else 0], **common) for i in range(depth)]
        )
        self.glue = rng.random() < 0.3  # per-layer scalar mixing in the parent loop, nanochat style
        self.lambdas = nn.Parameter(torch.rand(depth) + 0.5)
        self.defect = rng.choice([None] * 6 + ["skip", "collect", "grow"])
        # a state inside the stack read outside it: subtracted before the output, or an auxiliary head
        self.tap = rng.choice([None, None, "backout", "aux"])
        self.aux_head = nn.Linear(self.width, self.width)
        # a grad-mode or autocast region over the first layers, or a detach after the first
        self.region = rng.choice([None] * 5 + ["no_grad", "autocast", "detach"])
        self.embed = nn.Linear(4, self.width)

    def forward(self, x):
        h = self.embed(x)
        side = torch.sin(h)
        x0 = h
        if self.streams > 1:
            h = h.unsqueeze(-2).expand(*h.shape[:-1], self.streams, self.width).contiguous()
            x0 = h
        prev, states, kept = h, [], None
        frozen = max(1, len(self.layers) // 2)  # the layers a region covers (the first ones: frozen in fine-tuning)
        for i, layer in enumerate(self.layers):
            if self.glue:
                h = self.lambdas[i] * h
            with self._region() if i < frozen else contextlib.nullcontext():
                new = layer(h, side, x0).float()
            if self.region == "detach" and i == 0:
                new = new.detach()
            if self.defect == "skip":
                new = new + 0.1 * prev
            prev, h = h, new
            states.append(h)
            if i == len(self.layers) // 2 - 1 and self.tap is not None:
                kept = 0.3 * h if self.tap == "backout" else torch.tanh(self.aux_head(h))
            if self.defect == "grow" and i == 0:
                h = torch.cat([h, h], -1)[..., : self.width] * 1.1
        out = torch.stack(states).mean(0) if self.defect == "collect" else h
        out = out if kept is None else out - kept
        return out.sum(-2) if self.streams > 1 else out

    def _region(self):
        if self.region == "no_grad":
            return torch.no_grad()
        if self.region == "autocast":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _fuzz_case(seed: int) -> tuple[FuzzModel, SNLPConfig, int, random.Random]:
    """The model of `seed`, an SNLP configuration for it, and the iteration count that makes it exact."""
    rng = random.Random(seed)
    model = FuzzModel(rng)
    depth = len(model.layers)
    n_seq = rng.randint(0, depth - 2)
    blocks = rng.randint(1, depth - 1 - n_seq)  # at most the parallel layers of a stack without layer 0
    config = SNLPConfig(n_seq=n_seq, blocks=blocks, init=rng.choice(["h0", "batch_fwd"]), inner="eager")
    return model, config, max(len(sizes) for _, sizes in schedule(depth, config)), rng


def _tolerance(model: FuzzModel) -> float:
    """A whole stack under bf16 autocast is rewritten, and batched bf16 matmuls round differently."""
    return 2e-2 if model.region == "autocast" else 1e-5


@pytest.mark.parametrize("seed", range(24))
@torch.no_grad()
def test_fuzz_rewrite_is_exact_or_falls_back(seed, caplog):
    model, config, exact_iters, _ = _fuzz_case(seed)
    model.eval()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 5, 4)
    torch.manual_seed(seed)  # the same draws in the eager and the compiled call
    expected = reference(x)
    torch.manual_seed(seed)
    with caplog.at_level(logging.INFO, logger="snlp_compile"):
        out = torch.compile(model, backend="snlp", options=dict(vars(config), iters=exact_iters))(x)
    tol = _tolerance(model)
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    for (name, buffer), (_, eager_buffer) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        torch.testing.assert_close(buffer, eager_buffer, atol=1e-5, rtol=1e-5, msg=name)
    rewritten = "rewrote" in caplog.text
    assert rewritten or "unmodified" in caplog.text or "no graph" in caplog.text or not caplog.text
    plain = model.defect is None and model.region is None and not model.layers[0].running_stats
    # layer 0 runs before the stack (the `.float()` glue before every later layer has no counterpart
    # before it), so a two-layer model leaves one layer: no stack
    if plain and len(model.layers) > 2:
        assert rewritten, caplog.text
    torch._dynamo.reset()
    cheap = torch.compile(model, backend="snlp", options=dict(vars(config), iters=1))(x)
    assert torch.isfinite(cheap).all()


@pytest.mark.parametrize("seed", range(0, 24, 3))
def test_fuzz_training_gradients_and_state_equal_eager(seed):
    """With gradients: the same parameter gradients (None where eager's are None: no_grad regions,
    detach) and running statistics as eager, at the exact iteration count."""
    model, config, exact_iters, _ = _fuzz_case(seed)
    model.train()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 5, 4)
    torch.manual_seed(seed)
    reference(x).square().mean().backward()
    torch.manual_seed(seed)
    compiled = torch.compile(model, backend="snlp", options=dict(vars(config), iters=exact_iters))
    compiled(x).square().mean().backward()
    tol = _tolerance(model)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=tol, rtol=tol, msg=name)
    for (name, buffer), (_, eager_buffer) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        torch.testing.assert_close(buffer, eager_buffer, atol=1e-5, rtol=1e-5, msg=name)
