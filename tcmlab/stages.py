"""One small object per training stage (EDM's loss-class pattern): its time distribution, its ratio(i), its loss call.

`make_stage(cfg)` turns a RunConfig into `EDMStage` (stage 0), `ECTStage` (stage 1) or `TCMStage` (stage 2), so the
training loop (and the benchmark) has no stage branches. Every method is a pure function of its explicit inputs:
the iteration `i`, the global batch size, a generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ECTConfig, EDMConfig, RunConfig, TCMConfig
from .losses import LossOut, ect_loss, edm_loss, tcm_loss
from .precond import T_MAX
from .schedules import LogNormal, TruncatedLogStudentT, ect_ratio, n_boundary, tcm_times


@dataclass(frozen=True)
class EDMStage:
    """Stage 0: EDM diffusion pretraining, ln t ~ N(P_mean, P_std²) cut to [0.002, T]."""

    cfg: EDMConfig = EDMConfig()
    stage = 0
    needs_teacher = False

    def sample_times(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, None]:
        return LogNormal(self.cfg.P_mean, self.cfg.P_std, t_max=T_MAX).sample(batch, generator), None

    def ratio(self, i: int) -> None:
        return None

    def loss(self, f, x, eps, t, is_boundary, i: int, batch: int, f_minus=None, f0=None) -> LossOut:
        return edm_loss(f, x, eps, t, n_total=batch)


@dataclass(frozen=True)
class ECTStage:
    """Stage 1: ECT consistency training (TCM Eq. 4) with the curriculum ratio(i) (TCM App. E)."""

    cfg: ECTConfig = ECTConfig()
    stage = 1
    needs_teacher = False

    def sample_times(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, None]:
        c = self.cfg
        return LogNormal(c.P_mean, c.P_std, c.t_min, c.t_max).sample(batch, generator), None

    def ratio(self, i: int) -> float:
        return ect_ratio(i, self.cfg.q, self.cfg.d, self.cfg.ratio_max)

    def loss(self, f, x, eps, t, is_boundary, i: int, batch: int, f_minus=None, f0=None) -> LossOut:
        c = self.cfg
        return ect_loss(f, x, eps, t, self.ratio(i), c.c, c.weighting, n_total=batch, f_minus=f_minus)


@dataclass(frozen=True)
class TCMStage:
    """Stage 2: truncated consistency training (TCM Eq. 7–11, Algorithm 1) with the frozen θ0 `f0`."""

    cfg: TCMConfig = TCMConfig()
    stage = 2
    needs_teacher = True

    def sample_times(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        psi_bar = TruncatedLogStudentT(c.t_prime, c.t_max, c.psi_scale, c.psi_nu)
        return tcm_times(batch, c.t_prime, c.rho, psi_bar, generator)

    def ratio(self, i: int) -> float:
        return self.cfg.ratio  # held at ratio_max for all of stage 2 (TCM App. E)

    def loss(self, f, x, eps, t, is_boundary, i: int, batch: int, f_minus=None, f0=None) -> LossOut:
        c = self.cfg
        nb = n_boundary(batch, c.rho)
        return tcm_loss(f, f0, x, eps, t, is_boundary, c.t_prime, self.ratio(i), c.c, c.weighting, c.w_b,
                        c.teacher_passes, n_boundary_total=nb, n_consistency_total=batch - nb, f_minus=f_minus)


def make_stage(cfg: RunConfig) -> EDMStage | ECTStage | TCMStage:
    """The stage object of a RunConfig's loss config."""
    return {0: EDMStage, 1: ECTStage, 2: TCMStage}[cfg.stage](cfg.loss)
