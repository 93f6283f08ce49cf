"""What the tuner feeds a model and reads back: token ids in, logits out.

Invariants: a model is called as `model(tokens)` with tokens a LongTensor [B, T] on the model's
device; its output is logits [B, T, V], a tensor or the first item of a tuple / list, or the
`.logits` of an output object (Hugging Face).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

RANDOM_SHAPE = (1, 64)  # batch and length of the random token ids drawn when there is no data
RANDOM_SEED = 0


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: the tensor itself, `.logits`, or the first item of a tuple / list."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, Tensor) or logits.dim() < 2:
        raise TypeError(
            "tune: the model must return logits [B, T, V]: a tensor, a tuple whose first item is the logits, "
            f"or an object with .logits; got {type(output).__name__}"
        )
    return logits


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter: where the tuner runs and times it."""
    param = next(model.parameters(), None)
    if param is None:
        raise ValueError("tune: the model has no parameters, so it has no layer stack to tune")
    return param.device


def vocab_size(model: nn.Module, device: torch.device) -> int:
    """V, read off the logits of one forward of the one-token input [[0]]."""
    with torch.no_grad():
        return logits_of(model(torch.zeros((1, 1), dtype=torch.long, device=device))).shape[-1]


def random_tokens(vocab: int, device: torch.device) -> Tensor:
    """RANDOM_SHAPE token ids drawn uniformly from [0, vocab) by a CPU generator seeded with RANDOM_SEED
    (the same ids on every device and run), moved to `device`."""
    generator = torch.Generator().manual_seed(RANDOM_SEED)
    return torch.randint(0, vocab, RANDOM_SHAPE, generator=generator).to(device)
