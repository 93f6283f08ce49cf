"""The reference models written as solver-core layer stacks: what the backend must reproduce."""

import torch

from snlp_compile.models import MHCGPT
from snlp_compile.models.layers import rms_norm
from snlp_compile.models.mhc import sinkhorn
from snlp_compile.solver import CallableStack, Surrogate, solve


def solver_logits(model, idx, config, kv_cache=None):
    """Logits of `model` with its blocks solved by `solver.solve` under `config` (surrogate auto);
    with a KV cache, each layer writes its keys and values at each evaluation (the last one stays)
    and the cache advances by T, as in the model's forward."""
    cfg = model.config
    T = idx.shape[1]
    positions = torch.arange(T) + (0 if kv_cache is None else kv_cache.pos)
    cos, sin = model.cos[positions], model.sin[positions]
    x0 = model.expand(rms_norm(model.wte(idx)))

    def layer(i):
        def f(h):
            if cfg.x0_mixing:
                h = model.resid_lambdas[i] * h + model.x0_lambdas[i] * x0
            return model.blocks[i](h, cos, sin, positions, kv_cache)

        return f

    if isinstance(model, MHCGPT):
        mix = torch.stack(
            [
                sinkhorn(b.hc_mlp.res_logits, cfg.sinkhorn_iters) @ sinkhorn(b.hc_attn.res_logits, cfg.sinkhorn_iters)
                for b in model.blocks
            ]
        )
        if cfg.x0_mixing:
            mix = model.resid_lambdas[:, None, None] * mix
        surrogate = Surrogate("mix", mix)
    elif cfg.x0_mixing:
        surrogate = Surrogate("scale", model.resid_lambdas)
    else:
        surrogate = Surrogate()
    if config.surrogate == "identity":
        surrogate = Surrogate()
    stack = CallableStack([layer(i) for i in range(cfg.n_layer)], surrogate)
    h = solve(stack, x0, config)
    logits = model.lm_head(rms_norm(model.collapse(h))).float()
    if cfg.softcap is not None:
        logits = cfg.softcap * torch.tanh(logits / cfg.softcap)
    if kv_cache is not None:
        kv_cache.pos.add_(T)
    return logits
