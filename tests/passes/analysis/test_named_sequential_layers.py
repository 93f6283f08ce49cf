"""Layers that are children named `<prefix>_<i>` of an nn.Sequential built from an OrderedDict, as in
torchvision's vision transformer (vit_b_16, which cannot be installed here): the stack is found as
the `encoder_layer_<i>` entries, not as the children "0".."4" of each layer's MLP (an nn.Sequential
nested inside), and the backend rewrites it.

The model below re-creates torchvision's VisionTransformer layout and forward, module for module
and name for name (conv_proj patch embedding, class token, encoder.pos_embedding, encoder.layers =
Sequential(OrderedDict(encoder_layer_<i> = EncoderBlock)), encoder.ln, heads = Sequential(OrderedDict(
head = Linear))), at a tiny size. torchvision zero-initialises the head; here it is random, so that
the logits depend on the encoder.
"""

from collections import OrderedDict
from functools import partial

import pytest
import torch
from torch import nn

from snlp_compile import find_layer_stack

LAYERS = 4
IMAGES = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class MLPBlock(nn.Sequential):
    """torchvision's MLPBlock: children "0".."4" = Linear, GELU, Dropout, Linear, Dropout."""

    def __init__(self, in_dim: int, mlp_dim: int, dropout: float) -> None:
        super().__init__(nn.Linear(in_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, in_dim))
        self.append(nn.Dropout(dropout))


class EncoderBlock(nn.Module):
    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int, dropout: float, norm_layer) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.ln_1 = norm_layer(hidden_dim)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=0.0, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = norm_layer(hidden_dim)
        self.mlp = MLPBlock(hidden_dim, mlp_dim, dropout)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x)
        x = x + input
        y = self.ln_2(x)
        y = self.mlp(y)
        return x + y


class Encoder(nn.Module):
    def __init__(self, seq_length: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int, norm_layer):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(0.0)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(num_layers):
            layers[f"encoder_layer_{i}"] = EncoderBlock(num_heads, hidden_dim, mlp_dim, 0.0, norm_layer)
        self.layers = nn.Sequential(layers)
        self.ln = norm_layer(hidden_dim)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        input = input + self.pos_embedding
        return self.ln(self.layers(self.dropout(input)))


class VisionTransformer(nn.Module):
    def __init__(
        self, image_size=16, patch_size=4, num_layers=LAYERS, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=10
    ):
        super().__init__()
        self.image_size, self.patch_size, self.hidden_dim = image_size, patch_size, hidden_dim
        self.conv_proj = nn.Conv2d(3, hidden_dim, kernel_size=patch_size, stride=patch_size)
        seq_length = (image_size // patch_size) ** 2 + 1  # the patches and the class token
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim, norm_layer)
        self.seq_length = seq_length
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden_dim, num_classes)))

    def _process_input(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.patch_size
        torch._assert(h == self.image_size, f"Wrong image height! Expected {self.image_size} but got {h}!")
        torch._assert(w == self.image_size, f"Wrong image width! Expected {self.image_size} but got {w}!")
        n_h, n_w = h // p, w // p
        x = self.conv_proj(x)  # (n, c, h, w) -> (n, hidden_dim, n_h, n_w)
        x = x.reshape(n, self.hidden_dim, n_h * n_w)
        return x.permute(0, 2, 1)  # (n, seq_length - 1, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._process_input(x)
        n = x.shape[0]
        batch_class_token = self.class_token.expand(n, -1, -1)
        x = torch.cat([batch_class_token, x], dim=1)
        x = self.encoder(x)
        x = x[:, 0]  # the class token
        return self.heads(x)


def _vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer().eval()


def test_the_layout_is_torchvisions():
    model = _vit()
    assert list(dict(model.encoder.layers.named_children())) == [f"encoder_layer_{i}" for i in range(LAYERS)]
    block = model.encoder.layers.encoder_layer_0
    assert [name for name, _ in block.named_children()] == ["ln_1", "self_attention", "dropout", "ln_2", "mlp"]
    kinds = [type(m) for m in block.mlp]
    assert kinds == [nn.Linear, nn.GELU, nn.Dropout, nn.Linear, nn.Dropout] and isinstance(block.mlp, nn.Sequential)
    assert block.self_attention.batch_first


@torch.no_grad()
def test_the_stack_is_the_encoder_layers_not_the_mlp_children():
    (found,) = find_layer_stack(_vit(), (IMAGES,))
    assert found.found, found.reason
    assert found.container.endswith("encoder.layers.encoder_layer_") and "mlp" not in found.container
    assert found.layers == list(range(LAYERS)) and found.groups == [list(range(LAYERS))]
    assert found.surrogate == "identity"


@torch.no_grad()
def test_the_backend_rewrites_the_vision_transformer():
    model = _vit()
    expected = model(IMAGES)
    options = {"iters": LAYERS, "inner": "eager", "fallback": "error"}
    exact = torch.compile(model, backend="snlp", options=options)(IMAGES)
    torch.testing.assert_close(exact, expected, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
    cheap = torch.compile(model, backend="snlp", options={**options, "iters": 1})(IMAGES)
    assert (cheap - expected).abs().max() > 1e-3  # the layers really ran in parallel


class Block(nn.Module):
    def __init__(self, first: str, second: str) -> None:
        super().__init__()
        self.names = first, second
        for name in self.names:
            self.add_module(name, nn.Linear(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = (getattr(self, name) for name in self.names)
        return x + second(torch.tanh(first(x)))


class Attributes(nn.Module):
    """Layers as plain attributes (no container), called by name."""

    def __init__(self, names: list[str], children: tuple[str, str]) -> None:
        super().__init__()
        self.names = names
        for name in names:
            self.add_module(name, Block(*children))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            x = getattr(self, name)(x)
        return x


@torch.no_grad()
def test_numbered_attributes_are_a_stack_and_the_outermost_numbering_wins():
    model = Attributes(["block1", "block2", "block3"], ("fc1", "fc2"))
    (found,) = find_layer_stack(model, (torch.randn(2, 8),))
    assert found.found and found.container == "L['self'].block" and found.layers == [1, 2, 3]


@pytest.mark.parametrize("names", [["block1", "block3"], ["block1"]], ids=["not consecutive", "alone"])
def test_numbered_children_need_consecutive_siblings(names):
    (found,) = find_layer_stack(Attributes(names, ("up", "down")), (torch.randn(2, 8),))
    assert not found.found and "indexed module container" in found.reason
