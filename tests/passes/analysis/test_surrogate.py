"""The surrogate read off a layer's skip path (derive_recipe, choose_recipe) and evaluated on the layers'
parameters (evaluate_recipe, stack_surrogate): J is what the skip path multiplies the state by."""

import logging

import pytest
import torch
from torch import Tensor, nn
from torch.fx import Interpreter

from snlp_compile.passes.analysis.detect import detect_layer_stack
from snlp_compile.passes.analysis.stack import Layer, LayerStackMatch
from snlp_compile.passes.analysis.surrogate import SurrogateError, choose_recipe, derive_recipe
from snlp_compile.solver import Surrogate
from snlp_compile.solver.recipe import SurrogateRecipe, evaluate_recipe, stack_surrogate
from tests.helpers.dynamo_graphs import traced

DEPTH, STREAMS, WIDTH = 4, 3, 8


class Block(nn.Module):
    """One layer: `skip` is "plain" (x + f(x)), "gated" (a * x + f(x)), "mixed" (H @ x + f(x)),
    "gated-mixed" (a * (H @ x) + f(x)) or "none" (f(x))."""

    def __init__(self, skip: str, index: int):
        super().__init__()
        self.skip = skip
        self.norm, self.proj = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, WIDTH)
        self.a = nn.Parameter(torch.tensor(0.5 + 0.1 * index))
        self.H = nn.Parameter(torch.eye(STREAMS) + 0.1 * torch.randn(STREAMS, STREAMS))

    def forward(self, x: Tensor) -> Tensor:
        f = torch.tanh(self.proj(self.norm(x)))
        if self.skip == "plain":
            return x + f
        if self.skip == "gated":
            return self.a * x + f
        if self.skip == "mixed":
            return self.H @ x + f
        if self.skip == "gated-mixed":
            return self.a * (self.H @ x) + f
        return f


class Stack(nn.Module):
    def __init__(self, *skips: str):
        super().__init__()
        self.layers = nn.ModuleList([Block(skip, i) for i, skip in enumerate(skips)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def analysed(model: Stack) -> tuple[LayerStackMatch, dict]:
    """The stack detected in the model's dynamo graph, and every graph value as the graph computes it
    from the model's real parameters."""
    gm, inputs = traced(model, torch.randn(2, STREAMS, WIDTH))
    run = Interpreter(gm, garbage_collect_values=False)
    run.run(*inputs)
    return detect_layer_stack(gm), run.env


def stacked_surrogate(match: LayerStackMatch, values: dict, requested: str = "auto") -> Surrogate:
    """The stack's J as the compiler builds it: one recipe per layer group, evaluated on the group's
    inputs stacked along a leading layer axis."""
    recipes = [choose_recipe(match.layers[group[0]], requested) for group in match.groups]
    per_group = [
        [torch.stack(slot) for slot in zip(*(inputs_of(match.layers[p], values) for p in group), strict=True)]
        for group in match.groups
    ]
    return stack_surrogate(recipes, per_group, match.groups)


def inputs_of(layer: Layer, values: dict) -> list[Tensor]:
    return [values[node] for node in layer.inputs]


def only_recipe(match: LayerStackMatch) -> SurrogateRecipe:
    """The recipe every layer derives (the layers of these stacks have one structure)."""
    assert match.groups == [list(range(DEPTH))]
    recipes = {derive_recipe(layer) for layer in match.layers}
    assert len(recipes) == 1
    return recipes.pop()


def test_a_plain_residual_is_the_identity():
    match, values = analysed(Stack(*["plain"] * DEPTH).eval())
    recipe = only_recipe(match)
    assert recipe == SurrogateRecipe() and recipe.kind == "identity"
    assert evaluate_recipe(recipe, inputs_of(match.layers[0], values), 1) is None
    assert stacked_surrogate(match, values) == Surrogate()


def test_a_scalar_gate_scales_by_its_parameter():
    model = Stack(*["gated"] * DEPTH).eval()
    match, values = analysed(model)
    recipe = only_recipe(match)
    ((kind, (source, _)),) = recipe.factors
    assert (kind, source, recipe.kind) == ("scale", "input", "scale")
    for layer, block in zip(match.layers, model.layers, strict=True):
        torch.testing.assert_close(evaluate_recipe(recipe, inputs_of(layer, values), 1), block.a.detach()[None])
    surrogate = stacked_surrogate(match, values)
    assert surrogate.kind == "scale"
    torch.testing.assert_close(surrogate.values, torch.stack([block.a.detach() for block in model.layers]))


def test_stream_mixing_is_its_matrix():
    model = Stack(*["mixed"] * DEPTH).eval()
    match, values = analysed(model)
    recipe = only_recipe(match)
    ((kind, (source, _), stream, transposed, rank),) = recipe.factors
    assert (kind, source, recipe.kind, stream, transposed, rank) == ("mix", "input", "mix", (-2, 1), False, 2)
    for layer, block in zip(match.layers, model.layers, strict=True):
        torch.testing.assert_close(evaluate_recipe(recipe, inputs_of(layer, values), 1), block.H.detach()[None])
    surrogate = stacked_surrogate(match, values)
    assert surrogate.kind == "mix"
    torch.testing.assert_close(surrogate.values, torch.stack([block.H.detach() for block in model.layers]))
    assert choose_recipe(match.layers[0], "hc") == recipe
    assert choose_recipe(match.layers[0], "identity") == SurrogateRecipe()


def test_a_gate_on_the_mixing_scales_the_matrix():
    model = Stack(*["gated-mixed"] * DEPTH).eval()
    match, values = analysed(model)
    recipe = only_recipe(match)
    assert [factor[0] for factor in recipe.factors] == ["mix", "scale"] and recipe.kind == "mix"
    surrogate = stacked_surrogate(match, values)
    expected = torch.stack([block.a.detach() * block.H.detach() for block in model.layers])
    assert surrogate.kind == "mix"
    torch.testing.assert_close(surrogate.values, expected)


def test_groups_of_weaker_kinds_are_promoted_and_kept_in_stack_order():
    """Plain and gated layers alternate: two layer groups, identity and scale; the stack's J is 1 for
    the plain layers and the gate for the gated ones, in stack order."""
    model = Stack(*["plain", "gated"] * (DEPTH // 2)).eval()
    match, values = analysed(model)
    assert match.groups == [[0, 2], [1, 3]]
    surrogate = stacked_surrogate(match, values)
    assert surrogate.kind == "scale"
    expected = [1.0 if block.skip == "plain" else block.a.item() for block in model.layers]
    torch.testing.assert_close(surrogate.values, torch.tensor(expected))


def test_no_skip_path_warns_and_takes_the_identity(caplog):
    match, values = analysed(Stack(*["none"] * DEPTH).eval())
    assert all(derive_recipe(layer) is None for layer in match.layers)
    with caplog.at_level(logging.WARNING, logger="snlp_compile"):
        assert choose_recipe(match.layers[0], "auto") == SurrogateRecipe()
    (record,) = [r for r in caplog.records if r.name == "snlp_compile"]
    assert record.levelno == logging.WARNING
    assert f"stream mixing) in layer {match.layers[0].module_index}" in record.getMessage()
    assert stacked_surrogate(match, values) == Surrogate()


@pytest.mark.parametrize("skip", ["plain", "gated"])
def test_hc_needs_stream_mixing(skip):
    match, _ = analysed(Stack(*[skip] * DEPTH).eval())
    with pytest.raises(SurrogateError, match="surrogate='hc' needs stream mixing"):
        choose_recipe(match.layers[0], "hc")
