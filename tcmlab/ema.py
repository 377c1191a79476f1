"""Exponential moving averages of the weights: constant β (ECT/TCM CIFAR-10) and EDM2's power-function EMA
(docs/decisions.md §15)."""

from __future__ import annotations

import torch
from torch import nn


def ema_beta(i: int, kind: str, beta: float, gamma: float) -> float:
    """β after optimiser step i (1-based). 'const': β. 'power': (1 − 1/i)^(γ+1) (EDM2; official TCM code)."""
    if kind == "const":
        return beta
    if kind == "power":
        return (1 - 1 / max(i, 1)) ** (gamma + 1)
    raise ValueError(f"ema must be 'const' or 'power', got {kind!r}")


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, beta: float) -> None:
    """ema ← β·ema + (1 − β)·θ, in fp32, for every parameter (buffers are copied)."""
    e = [p for p in ema.parameters()]
    n = [p.detach() for p in net.parameters()]
    torch._foreach_lerp_(e, n, 1 - beta)
    for be, bn in zip(ema.buffers(), net.buffers()):
        be.copy_(bn)
