"""A residual MLP F(x, c_noise) with a sinusoidal time embedding, for 2-D points and flattened 8×8 digits."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import RowDropout
from .layers import PositionalEmbedding


class MLPBlock(nn.Module):
    def __init__(self, hidden, emb_dim, dropout):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc0 = nn.Linear(hidden, hidden)
        self.affine = nn.Linear(emb_dim, hidden)
        self.dropout = RowDropout(dropout)
        self.fc1 = nn.Linear(hidden, hidden)

    def forward(self, h, emb):
        y = F.silu(self.fc0(F.silu(self.norm(h))) + self.affine(emb).to(h.dtype))
        return h + self.fc1(self.dropout(y))


class MLP(nn.Module):
    """F(x, c_noise) on samples of any `shape` (flattened inside); `depth` residual blocks of width `hidden`."""

    def __init__(self, shape, hidden=256, depth=3, emb_dim=64, dropout=0.0):
        super().__init__()
        self.shape = tuple(shape)
        dim = math.prod(self.shape)
        self.map_noise = PositionalEmbedding(emb_dim, endpoint=True)
        self.map_layer = nn.Linear(emb_dim, emb_dim)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden, emb_dim, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x, c_noise):
        emb = F.silu(self.map_layer(self.map_noise(c_noise)))
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h))).reshape(x.shape)
