"""Layers of EDM's DDPM++ (NVlabs/edm `training/networks.py`), rewritten with the same parameter names
(`weight`, `bias`, `resample_filter`) so official state can be loaded by name."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def weight_init(shape, mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """EDM weight initialisation (xavier_uniform / kaiming_uniform / ...)."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"invalid init mode {mode!r}")


class Linear(nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode="kaiming_normal", init_weight=1.0,
                 init_bias=0.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        kw = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **kw) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **kw) * init_bias) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    """Convolution with optional FIR up/down-sampling (kernel 0 = resampling only), as in EDM."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=(1, 1),
                 init_mode="kaiming_normal", init_weight=1.0, init_bias=0.0):
        super().__init__()
        assert not (up and down)
        self.in_channels, self.out_channels, self.up, self.down = in_channels, out_channels, up, down
        kw = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **kw) * init_weight)
                       if kernel else None)
        self.bias = nn.Parameter(weight_init([out_channels], **kw) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = f.ger(f).unsqueeze(0).unsqueeze(1) / f.sum().square()
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x):
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.up:
            x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                                   padding=f_pad)
        if self.down:
            x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
        if w is not None:
            x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype),
                            bias=self.bias.to(x.dtype), eps=self.eps)


class PositionalEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of the noise label c_noise (DDPM++, EDM `PositionalEmbedding`)."""

    def __init__(self, num_channels, max_positions=10000, endpoint=True):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.to(torch.float32).ger(freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


INIT = dict(init_mode="xavier_uniform")
INIT_ZERO = dict(init_mode="xavier_uniform", init_weight=1e-5)
INIT_ATTN = dict(init_mode="xavier_uniform", init_weight=float(np.sqrt(0.2)))
