import pytest
import torch

from snlp_compile.models import GPT, GPTConfig


@pytest.fixture
def tiny_gpt() -> GPT:
    """The tiny preset (4 layers, vocabulary 64, context 64), random weights, eval mode."""
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny")).eval()
