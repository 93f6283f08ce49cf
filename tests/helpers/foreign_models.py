"""Small, faithful re-creations of model forms nobody here designed for: the SNLP paper's nanochat GPT
(x0 / lambda mixing in the loop, value embeddings on alternating layers, a backout tap) and its mHC
variant (streams folded into the batch, H_res by Sinkhorn inside the layer, mixing by einsum)."""

import torch
import torch.nn.functional as F
from torch import nn


def norm(x):
    return F.rms_norm(x, (x.shape[-1],))


def sinkhorn(logits, iters=4):
    p = logits.exp()
    for _ in range(iters):
        p = p / p.sum(-1, keepdim=True)
        p = p / p.sum(-2, keepdim=True)
    return p


class NanoBlock(nn.Module):
    """Pre-norm causal attention (a value embedding added to v where given) and a relu^2 MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(width, 3 * width, bias=False), nn.Linear(width, width, bias=False)
        self.up, self.down = nn.Linear(width, 4 * width, bias=False), nn.Linear(4 * width, width, bias=False)

    def forward(self, x, ve=None):
        b, t, d = x.shape
        q, k, v = self.qkv(norm(x)).split(d, dim=-1)
        if ve is not None:
            v = v + ve
        q, k, v = (y.view(b, t, self.heads, d // self.heads).transpose(1, 2) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.down(F.relu(self.up(norm(x))).square())


class NanoGPT(nn.Module):
    """nanochat's trunk: x = resid_lambda_i * x + x0_lambda_i * x0 before each block, value embeddings
    on alternating layers, the state after layer L // 2 subtracted before the head (backout)."""

    def __init__(self, vocab: int = 64, width: int = 32, heads: int = 4, depth: int = 6):
        super().__init__()
        self.wte, self.lm_head = nn.Embedding(vocab, width), nn.Linear(width, vocab, bias=False)
        self.h = nn.ModuleList([NanoBlock(width, heads) for _ in range(depth)])
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vocab, width) for i in range(1, depth, 2)})
        self.resid_lambdas = nn.Parameter(torch.linspace(0.9, 1.1, depth))
        self.x0_lambdas = nn.Parameter(torch.linspace(0.2, -0.1, depth))
        self.backout_lambda = nn.Parameter(torch.tensor(0.3))

    def forward(self, idx):
        x = x0 = norm(self.wte(idx))
        backout = None
        for i, block in enumerate(self.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve)
            if i == len(self.h) // 2:
                backout = x
        return self.lm_head(norm(x - self.backout_lambda * backout))


class FoldedMHCBlock(nn.Module):
    """The mHC layer on a state [B * M, T, D]: H_res by Sinkhorn from its logits, mixing by einsum over
    the unfolded streams, a pre mix into one sublayer input and a post mix of its output."""

    def __init__(self, width: int, streams: int):
        super().__init__()
        self.streams = streams
        self.res_logits = nn.Parameter(2.0 * torch.eye(streams) + 0.3 * torch.randn(streams, streams))
        self.pre, self.post = nn.Parameter(torch.randn(streams)), nn.Parameter(torch.randn(streams))
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.Tanh(), nn.Linear(2 * width, width))

    def forward(self, x):
        bm, t, d = x.shape
        residuals = x.view(bm // self.streams, self.streams, t, d)
        update = self.mlp(norm(torch.einsum("j,bjkl->bkl", self.pre.softmax(-1), residuals)))
        mixed = torch.einsum("ij,bjkl->bikl", sinkhorn(self.res_logits), residuals)
        return (mixed + self.post.softmax(-1)[None, :, None, None] * update[:, None]).reshape(bm, t, d)


class FoldedMHC(nn.Module):
    """Streams expanded into the batch after the embedding and summed before the head."""

    def __init__(self, vocab: int = 64, width: int = 16, streams: int = 3, depth: int = 4):
        super().__init__()
        self.streams = streams
        self.wte, self.lm_head = nn.Embedding(vocab, width), nn.Linear(width, vocab, bias=False)
        self.blocks = nn.ModuleList([FoldedMHCBlock(width, streams) for _ in range(depth)])

    def forward(self, idx):
        b, t = idx.shape
        x = norm(self.wte(idx))
        x = x.unsqueeze(1).expand(b, self.streams, t, x.shape[-1]).reshape(b * self.streams, t, x.shape[-1])
        for block in self.blocks:
            x = block(x)
        return self.lm_head(norm(x.view(b, self.streams, t, -1).sum(1)))


class BlockStack(nn.Module):
    """`depth` blocks of one class applied in turn: the plainest layer stack."""

    def __init__(self, block, depth: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList([block() for _ in range(depth)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x
