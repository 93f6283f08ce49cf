"""The built-in decoders (`snlp_compile.models.DecoderLM`: GPT, MHCGPT) cut into what a rank of a
depth-parallel solve runs: embedding, the layers it holds, their Jacobian surrogates, and the head.

Invariants: layer i computes what `DecoderLM._forward` computes for it (its x0 mixing included:
f_i(h) = block_i(lambda_i h + mu_i x0, ...)), and its surrogate is the one the compiler reads off
its skip path (identity; lambda_i I with x0 mixing; H_res of the MLP times H_res of the attention for
an mHC block), so a solve over these layers is the compiled model's solve. `shell` never changes
the user's model: it is a shallow copy holding only the kept layers (sharing their tensors), or,
given a device, a deep copy of that on the device.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import SNLPConfig
from ..models.gpt import Block, DecoderLM
from ..models.kv_cache import StaticKVCache
from ..models.layers import rms_norm
from ..models.mhc import MHCBlock, sinkhorn
from ..solver import IDENTITY, Surrogate

SUPPORTED = (
    "a snlp_compile.models decoder (a DecoderLM such as GPT or MHCGPT, whose blocks are Block or MHCBlock): "
    "depth_parallel needs each layer as a function of its state and the layer's Jacobian surrogate, which it "
    "knows for these blocks only; run other models single-process with torch.compile(model, backend='snlp')"
)


def check_decoder(model: nn.Module, config: SNLPConfig) -> None:
    """TypeError unless depth_parallel knows the model's layers; ValueError for a surrogate it lacks."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(model, DecoderLM) or not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"depth_parallel: {type(model).__name__} is not supported; it needs {SUPPORTED}")
    kinds = {type(b) for b in blocks}
    if not kinds <= {Block, MHCBlock}:
        names = sorted(k.__name__ for k in kinds - {Block, MHCBlock})
        raise TypeError(f"depth_parallel: blocks of type {names} are not supported; it needs {SUPPORTED}")
    if config.surrogate == "hc" and kinds != {MHCBlock}:
        raise ValueError(
            "surrogate='hc' needs stream mixing (H_res @ h) on every layer's skip path, and this model's "
            "Block layers have none; use surrogate='auto' or 'identity'"
        )


def shell(model: DecoderLM, kept: list[int], device: torch.device | str | None) -> DecoderLM:
    """The model with `blocks` = its blocks at `kept` (in that order) and every other part of it.

    device None: a shallow copy sharing the model's tensors (no copy); else a deep copy of that
    shallow copy moved to `device` (the other layers are never copied)."""
    out = copy.copy(model)
    out._modules, out._parameters, out._buffers = dict(model._modules), dict(model._parameters), dict(model._buffers)
    out._modules["blocks"] = nn.ModuleList([model.blocks[i] for i in kept])
    return out if device is None else copy.deepcopy(out).to(device)


@dataclass
class Call:
    """What every layer of one forward reads besides its state."""

    x0: Tensor
    cos: Tensor
    sin: Tensor
    positions: Tensor
    kv_cache: StaticKVCache | None


def embed(model: DecoderLM, idx: Tensor, kv_cache: StaticKVCache | None) -> tuple[Tensor, Call]:
    """(layer 0's input state, the call's side inputs) for token ids idx [B, T]."""
    B, T = idx.shape
    positions = torch.arange(T, device=idx.device)
    if kv_cache is not None:
        kv_cache.check(B, T)
        positions = positions + kv_cache.pos
    x = model.expand(rms_norm(model.wte(idx)))
    return x, Call(x, model.cos[positions], model.sin[positions], positions, kv_cache)


def layer(model: DecoderLM, slot: int, index: int, call: Call, h: Tensor) -> Tensor:
    """Layer `index` of the whole model (held at model.blocks[slot]) on state h, with its x0 mixing."""
    if model.config.x0_mixing:
        h = model.resid_lambdas[index] * h + model.x0_lambdas[index] * call.x0
    return model.blocks[slot](h, call.cos, call.sin, call.positions, call.kv_cache)


def head(model: DecoderLM, h: Tensor) -> Tensor:
    """Final state -> float logits [B, T, vocab_size] (softcapped where the model caps them)."""
    logits = model.lm_head(rms_norm(model.collapse(h))).float()
    cap = model.config.softcap
    return logits if cap is None else cap * torch.tanh(logits / cap)


def surrogate_inputs(model: DecoderLM, slots: list[int]) -> list[Tensor]:
    """The parameters the surrogate of the layers at `slots` is computed from."""
    params = [model.resid_lambdas] if model.config.x0_mixing else []
    for slot in slots:
        block = model.blocks[slot]
        if isinstance(block, MHCBlock):
            params += [block.hc_attn.res_logits, block.hc_mlp.res_logits]
    return params


def surrogate(model: DecoderLM, slots: list[int], indices: list[int], config: SNLPConfig) -> Surrogate:
    """J of the layers `indices` of the whole model (held at model.blocks[slots]), in that order."""
    if config.surrogate == "identity":
        return IDENTITY
    iters = model.config.sinkhorn_iters
    blocks = [model.blocks[s] for s in slots]
    scale = model.resid_lambdas[indices] if model.config.x0_mixing else None
    if not any(isinstance(b, MHCBlock) for b in blocks):
        return IDENTITY if scale is None else Surrogate("scale", scale)
    mix = torch.stack([sinkhorn(b.hc_mlp.res_logits, iters) @ sinkhorn(b.hc_attn.res_logits, iters) for b in blocks])
    return Surrogate("mix", mix if scale is None else scale[:, None, None] * mix)
