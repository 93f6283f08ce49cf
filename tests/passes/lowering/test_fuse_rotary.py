"""fuse_rotary: the rotate-half rotary embedding's nine ops become one snlp::rotary call, with the same value."""

import pytest
import torch

import snlp_compile.passes.lowering.eager_kernels as rewrite
from snlp_compile.models import GPT, GPTConfig
from snlp_compile.passes.lowering.rotary import fuse_rotary
from tests.helpers.dynamo_graphs import traced


def _fused(fn, x_shape=(2, 7, 3, 16), table_shape=(7, 1, 8)) -> int:
    """How many rotary patterns fuse_rotary replaced in fn's graph, checking that the outputs are bitwise
    the same, that the inputs end as they did and that the new node carries its traced value."""
    torch.manual_seed(0)
    angles = torch.randn(*table_shape)
    return _fused_on(fn, torch.randn(*x_shape), angles.cos(), angles.sin())


def _fused_on(fn, *args: torch.Tensor) -> int:
    """`_fused` for given inputs (their values before dynamo's own run, which may write to them)."""
    pristine = [t.clone() for t in args]
    gm, inputs = traced(fn, *args)
    inputs = [pristine[next(i for i, a in enumerate(args) if a is t)] for t in inputs]
    unfused_inputs, fused_inputs = [t.clone() for t in inputs], [t.clone() for t in inputs]
    expected = gm(*unfused_inputs)
    fused = fuse_rotary(gm.graph)
    gm.recompile()
    for got, want in zip(gm(*fused_inputs), expected, strict=True):
        assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(fused_inputs, unfused_inputs, strict=True))  # in-place writes too
    calls = [n for n in gm.graph.nodes if n.target is torch.ops.snlp.rotary.default]
    assert len(calls) == fused and all("example_value" in n.meta for n in calls)
    return fused


def _halves(x):
    d = x.size(-1) // 2
    return x[..., :d], x[..., d:]


def nanochat(x, cos, sin):
    x1, x2 = _halves(x)
    return (torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1),)


def commuted(x, cos, sin):
    x1, x2 = _halves(x)
    return (torch.cat((sin * x2 + cos * x1, x2 * cos - x1 * sin), -1),)


def negated_product(x, cos, sin):
    x1, x2 = _halves(x)
    return (torch.cat([x1 * cos + x2 * sin, x2 * cos + -(x1 * sin)], dim=3),)


def explicit_slices(x, cos, sin):
    x1, x2 = x[:, :, :, :8], x[:, :, :, 8:16]
    return (torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1),)


@pytest.mark.parametrize("fn", [nanochat, commuted, negated_product, explicit_slices])
def test_rotary_forms_are_fused_bitwise(fn):
    assert _fused(fn) == 1


def test_two_rotary_embeddings_in_one_graph():
    def q_and_k(x, cos, sin):
        return nanochat(x, cos, sin)[0], nanochat(x * 2, cos, sin)[0]

    assert _fused(q_and_k) == 2


def swapped_tables(x, cos, sin):  # not a rotation: the second half uses cos where sin belongs
    x1, x2 = _halves(x)
    return (torch.cat([x1 * cos + x2 * sin, -x1 * cos + x2 * sin], dim=-1),)


def wrong_sign(x, cos, sin):
    x1, x2 = _halves(x)
    return (torch.cat([x1 * cos - x2 * sin, -x1 * sin + x2 * cos], dim=-1),)


def uneven_split(x, cos, sin):
    x1, x2 = x[..., :6], x[..., 6:12]  # halves of the first 12 of x's 16 features
    c, s = cos[..., :6], sin[..., :6]
    return (torch.cat([x1 * c + x2 * s, -x1 * s + x2 * c], dim=-1),)


def halves_of_two_tensors(x, cos, sin):
    x1, x2 = x[..., :8], (x * 2)[..., 8:]
    return (torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1),)


def value_read_elsewhere(x, cos, sin):
    x1, x2 = _halves(x)
    first = x1 * cos + x2 * sin
    return torch.cat([first, -x1 * sin + x2 * cos], dim=-1), first


def concatenated_along_another_dim(x, cos, sin):
    x1, x2 = _halves(x)
    return (torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=0),)


def write_in_between(x, cos, sin):
    x1, x2 = _halves(x)
    first = x1 * cos + x2 * sin
    x.mul_(2)  # the second half reads the doubled x
    return (torch.cat([first, -x1 * sin + x2 * cos], dim=-1),)


@pytest.mark.parametrize(
    "fn",
    [
        swapped_tables,
        wrong_sign,
        uneven_split,
        halves_of_two_tensors,
        value_read_elsewhere,
        concatenated_along_another_dim,
        write_in_between,
    ],
)
def test_what_is_not_the_rotary_pattern_stays(fn):
    assert _fused(fn) == 0


def foreach_write_in_between(x, cos, sin):
    x1, x2 = _halves(x)
    first = x1 * cos + x2 * sin
    torch._foreach_mul_([x], 2.0)
    return (torch.cat([first, -x1 * sin + x2 * cos], dim=-1),)


def out_tuple_write_in_between(x, cos, sin):
    x1, x2 = _halves(x)
    first = x1 * cos + x2 * sin
    torch.sort(sin * 0 - 1, dim=-1, out=(cos, torch.empty(cos.shape, dtype=torch.long)))  # cos := -1
    return (torch.cat([first, -x1 * sin + x2 * cos], dim=-1),)


def channels_last_read_by_layout(x, cos, sin):  # cat keeps x's channels_last layout, which as_strided reads
    out = nanochat(x.contiguous(memory_format=torch.channels_last), cos, sin)[0]
    return (out.as_strided((out.numel(),), (1,)),)


@pytest.mark.parametrize("fn", [foreach_write_in_between, out_tuple_write_in_between, channels_last_read_by_layout])
def test_writes_and_layouts_found_by_review_stay(fn):
    assert _fused(fn) == 0


def test_scalar_or_other_dtype_tables_stay():
    """0-dim or float32 tables with a bfloat16 x: type promotion depends on the order of a product's
    operands (on CPU `cos * x1` rounds a 0-dim cos to bfloat16 first), which snlp::rotary does not keep."""
    x = (torch.randn(2, 7, 3, 16) * 4).bfloat16()
    assert _fused_on(commuted, x.clone(), torch.tensor(0.123456789), torch.tensor(0.987654321)) == 0
    angles = torch.randn(7, 1, 8)
    assert _fused_on(commuted, x.clone(), angles.cos(), angles.sin()) == 0
    assert _fused_on(commuted, x.clone(), angles.cos().bfloat16(), angles.sin().bfloat16()) == 1


def test_scalar_tables_from_item_stay():
    def from_item(x, angles):
        c, s = angles.cos().item(), angles.sin().item()
        x1, x2 = _halves(x)
        return (torch.cat([x1 * c + x2 * s, -x1 * s + x2 * c], dim=-1),)

    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        assert _fused_on(from_item, torch.randn(3, 16), torch.tensor(0.7)) == 0


def test_tables_that_would_broadcast_x_larger_stay():
    assert _fused(nanochat, x_shape=(7, 3, 16), table_shape=(2, 7, 1, 8)) == 0


def test_eager_inner_compiler_fuses_the_block_rotary_bitwise(monkeypatch):
    """GPT through the backend with the eager inner compiler: the block's layer graph and the one for
    sequential layers (q's and k's rotary as one twin) take one snlp::rotary each, and the output is
    bitwise what it is without the pass."""
    torch.manual_seed(0)
    config = GPTConfig.preset("tiny")
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (2, 16))
    options = dict(n_seq=1, iters=2, inner="eager", fallback="error")
    counts = []
    real = rewrite.fuse_rotary
    monkeypatch.setattr(rewrite, "fuse_rotary", lambda graph: counts.append(real(graph)) or counts[-1])
    with torch.no_grad():
        fused = torch.compile(model, backend="snlp", options=options, dynamic=False)(idx)
        monkeypatch.setattr(rewrite, "fuse_rotary", lambda graph: 0)
        torch._dynamo.reset()
        plain = torch.compile(model, backend="snlp", options=options, dynamic=False)(idx)
    assert counts == [1, 1] and torch.equal(fused, plain)
