"""EDM preconditioning: the consistency function f(x, t) built around a free-form network F(x, c_noise).

TCM Eq. (3) with c_skip, c_out of TCM App. E and EDM's c_in, c_noise (as the official `ECMPrecond`). The official
TCM code uses these scalings at every t (no σ_min shift), so f(x, t) -> x only as t -> 0 (docs/decisions.md §13);
see `tests/test_precond.py` for the boundary behaviour.
"""

from __future__ import annotations

import torch
from torch import nn

SIGMA_DATA = 0.5  # TCM App. E
T_MAX = 80.0  # T, the largest noise level (TCM App. E); configs' t_max fields default to it (docs/decisions.md §3)


def edm_scalings(t: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """TCM Eq. (3): (c_skip, c_out, c_in, c_noise) for noise level t; c_skip, c_out from TCM App. E, c_in and
    c_noise from EDM (Karras et al. 2022, Table 1), as the official TCM code's `ECMPrecond`.

    c_skip = σ_d²/(t²+σ_d²), c_out = t·σ_d/√(t²+σ_d²), c_in = 1/√(t²+σ_d²), c_noise = ln(t)/4.
    """
    t = torch.as_tensor(t)
    c_skip = sigma_data**2 / (t**2 + sigma_data**2)
    c_out = t * sigma_data / (t**2 + sigma_data**2).sqrt()
    c_in = 1 / (t**2 + sigma_data**2).sqrt()
    c_noise = t.log() / 4
    return c_skip, c_out, c_in, c_noise


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-sample vector [B] to [B, 1, ..., 1] with `ndim` dimensions in all."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


class Precond(nn.Module):
    """f_θ(x, t) = c_skip(t)·x + c_out(t)·F_θ(c_in(t)·x, c_noise(t)) (TCM Eq. 3, EDM scalings).

    `net` is any module F(x, c_noise) -> tensor shaped like x. Scalings are computed in float32 whatever dtype the
    network runs in: with `autocast_dtype` (torch.bfloat16 / torch.float16) only F runs under autocast, while
    preconditioning, losses and EMA stay in float32.
    """

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data
        self.autocast_dtype = autocast_dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = (append_dims(c, x.ndim) for c in edm_scalings(t, self.sigma_data))
        with torch.autocast(x.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            F_x = self.net(c_in * x, c_noise.flatten())
        return c_skip * x + c_out * F_x.to(torch.float32)

    def extra_repr(self) -> str:
        return f"parameterization=edm, sigma_data={self.sigma_data}, autocast_dtype={self.autocast_dtype}"
