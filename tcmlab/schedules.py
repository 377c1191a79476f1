"""Schedules and time distributions, all pure functions of explicit inputs (the iteration `i` is an argument).

- `ect_ratio(i, q, d, ratio_max)`: the ECT/TCM curriculum (TCM App. E, official-code form).
- `ect_r(t, ratio)` / `delta_t(t, ratio)`: r and Δt = (1 + 8·sigmoid(−t))·(1 − ratio)·t with r = t − Δt clamped at
  ≥ 1e-6 (Δt: TCM App. E; the clamp: official `delta_sigmoid`).
- `LogNormal`: stage-0/1 time distribution, log-normal truncated to [t_min, t_max] by inverse CDF (torch's `ndtri`).
- `TruncatedLogStudentT`: stage-2 ψ̄_t, ln t = ln t′ + s·Z with Z ~ Student-t(ν), truncated to [t′, T]; sampled
  in torch from a cached table of its exact log-quantile (`log_quantile_table`, cubic Hermite, |Δ ln t| ≤ 1e-8).
- `n_boundary` / `tcm_times`: TCM Eq. (7) / Algorithm 1 batch partition: N_B = int(B·ρ) boundary rows at t′, at random
  positions of the batch, the rest from ψ̄_t (docs/decisions.md §5).
- `inverse_sqrt_lr`: α_ref / √max(i / t_ref, 1) (TCM App. E, EDM2).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from .precond import T_MAX

R_MIN = 1e-6  # official TCM code: r = t − Δt is clamped at 1e-6 (never 0), docs/decisions.md §2


def ect_ratio(i: int, q: float, d: int, ratio_max: float) -> float:
    """TCM App. E: ratio(i) = min(1 − 1/q^(⌊i/d⌋+1), ratio_max).

    The paper prints `max{1 − 1/q^⌈i/d⌉, ratio_max}`; the official code uses min and ⌊i/d⌋+1, so training starts at
    1 − 1/q (0.5 for q = 2), not at 0 (docs/decisions.md §1). Computed as 1 − q^−k, which underflows to 1 − 0
    instead of overflowing for any i.
    """
    if i < 0:
        raise ValueError(f"iteration i must be >= 0, got {i}")
    return min(1.0 - float(q) ** -(i // d + 1), ratio_max)


def ect_r(t: torch.Tensor, ratio: float) -> torch.Tensor:
    """TCM App. E: r = t − (1 + 8·sigmoid(−t))·(1 − ratio)·t, clamped at ≥ 1e-6 (official `delta_sigmoid`)."""
    t = torch.as_tensor(t)
    return (t - (1 + 8 * torch.sigmoid(-t)) * (1 - ratio) * t).clamp(min=R_MIN)


def delta_t(t: torch.Tensor, ratio: float) -> torch.Tensor:
    """TCM App. E: Δt = (1 + 8·sigmoid(−t))·(1 − ratio)·t, i.e. t − r with r clamped at ≥ 1e-6 (official code)."""
    t = torch.as_tensor(t)
    return t - ect_r(t, ratio)


def inverse_sqrt_lr(i: int, lr_ref: float, t_ref: int) -> float:
    """TCM App. E / EDM2: α(i) = α_ref / √max(i / t_ref, 1); t_ref = 0 means a constant rate."""
    if t_ref <= 0:
        return lr_ref
    return lr_ref / math.sqrt(max(i / t_ref, 1.0))


@functools.lru_cache(maxsize=64)
def _normal_mass(mean: float, std: float, t_min: float, t_max: float) -> tuple[float, float]:
    z = (np.log([t_min, t_max]) - mean) / std
    a, b = stats.norm.cdf(z)
    return float(a), float(b)


@dataclass(frozen=True)
class LogNormal:
    """ln t ~ N(mean, std²) truncated to [t_min, t_max] by inverse CDF (TCM App. E; TCM code truncates, ECT doesn't)."""

    mean: float = -1.1  # TCM App. E, CIFAR-10
    std: float = 2.0  # TCM App. E, CIFAR-10
    t_min: float = 0.002  # official TCM code (t_lower)
    t_max: float = T_MAX  # T, TCM App. E

    def __post_init__(self):
        if not self.std > 0:
            raise ValueError(f"LogNormal.std must be > 0, got {self.std}")
        if not 0 < self.t_min < self.t_max:
            raise ValueError(f"LogNormal needs 0 < t_min < t_max, got t_min={self.t_min}, t_max={self.t_max}")

    def _z(self, t):
        return (np.log(t) - self.mean) / self.std

    def _mass(self):
        """(Φ(z(t_min)), Φ(z(t_max))): the normal CDF at the truncation points, computed once per distribution."""
        return _normal_mass(self.mean, self.std, self.t_min, self.t_max)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Inverse CDF of float64 uniforms u from `generator`: ln t = mean + std·Φ⁻¹(a + (b − a)·u), in torch
        (`torch.special.ndtri`, float64; it and scipy's `norm.ppf` agree to ~1e-15), so a training step's draw makes
        no scipy call."""
        a, b = self._mass()
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        z = torch.special.ndtri(a + (b - a) * u)
        return torch.exp(self.mean + self.std * z).clamp(self.t_min, self.t_max).float()

    def pdf(self, t) -> np.ndarray:
        """Density in t (not ln t), zero outside [t_min, t_max]."""
        t = np.asarray(t, dtype=np.float64)
        a, b = self._mass()
        inside = (t >= self.t_min) & (t <= self.t_max)
        p = stats.norm.pdf(self._z(np.clip(t, self.t_min, self.t_max))) / (self.std * t * (b - a))
        return np.where(inside, p, 0.0)

    def cdf(self, t) -> np.ndarray:
        t = np.clip(np.asarray(t, dtype=np.float64), self.t_min, self.t_max)
        a, b = self._mass()
        return (stats.norm.cdf(self._z(t)) - a) / (b - a)


@dataclass(frozen=True)
class TruncatedLogStudentT:
    """ψ̄_t of TCM Eq. (7): ln t = ln t′ + scale·Z, Z ~ Student-t(ν), truncated to [t′, t_max] by inverse CDF.

    Location ln t′ as in the official code (the paper does not state it). For t′ = 1, scale 0.2, ν = 0.01:
    median ≈ 1.22, P(t < 2) ≈ 0.70, 90th percentile ≈ 10.5 (docs/decisions.md §4).
    """

    t_prime: float = 1.0  # TCM §4, CIFAR-10
    t_max: float = T_MAX  # T
    scale: float = 0.2  # TCM §4.4 / App. E
    nu: float = 0.01  # TCM §4.4 / App. E

    def __post_init__(self):
        if not 0 < self.t_prime < self.t_max:
            raise ValueError(f"t_prime must lie in (0, t_max={self.t_max}), got {self.t_prime}")
        if not self.scale > 0:
            raise ValueError(f"psi scale must be > 0, got {self.scale}")
        if not self.nu > 0:
            raise ValueError(f"psi nu must be > 0, got {self.nu}")

    def _z(self, t):
        return (np.log(t) - math.log(self.t_prime)) / self.scale

    def _mass(self):
        return stats.t.cdf(self._z(self.t_prime), self.nu), stats.t.cdf(self._z(self.t_max), self.nu)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Inverse CDF of float64 uniforms u from `generator`: t = Q(u), Q = `quantile`, evaluated through
        `log_quantile_table(self)` (built once per distribution; |ln Q(u) − table| ≤ 1e-8, checked when built), or by
        scipy where no table reaches that (a narrow ψ̄ with large ν: the quantile's last cell is too steep)."""
        u = torch.rand(n, generator=generator, dtype=torch.float64).numpy()
        table = log_quantile_table(self)
        t = np.exp(self.log_quantile(u) if table is None else table.log_quantile(u))
        return torch.from_numpy(t).clamp(self.t_prime, self.t_max).float()

    def pdf(self, t) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        a, b = self._mass()
        inside = (t >= self.t_prime) & (t <= self.t_max)
        p = stats.t.pdf(self._z(np.clip(t, self.t_prime, self.t_max)), self.nu) / (self.scale * t * (b - a))
        return np.where(inside, p, 0.0)

    def cdf(self, t) -> np.ndarray:
        t = np.clip(np.asarray(t, dtype=np.float64), self.t_prime, self.t_max)
        a, b = self._mass()
        return (stats.t.cdf(self._z(t), self.nu) - a) / (b - a)

    def quantile(self, p) -> np.ndarray:
        """Q(p) = exp(ln t′ + s·F_ν⁻¹(F_ν(z(t′)) + (F_ν(z(T)) − F_ν(z(t′)))·p)), exact (scipy)."""
        return np.exp(self.log_quantile(p))

    def _z_of(self, p) -> tuple[np.ndarray, float]:
        """z = F_ν⁻¹(F_ν(z(t′)) + (F_ν(z(T)) − F_ν(z(t′)))·p) and the truncated mass F_ν(z(T)) − F_ν(z(t′)). Where
        F_ν(z(T)) is within 1e-3 of 1 (large ν: from ν ≈ 2 at scale 0.2, T = 80) the same point is found from the survival
        function, z = S_ν⁻¹(S_ν(z(T)) + (S_ν(z(t′)) − S_ν(z(T)))·(1 − p)): F_ν⁻¹ of a probability that close to 1
        loses its digits."""
        p = np.asarray(p, dtype=np.float64)
        sb = stats.t.sf(self._z(self.t_max), self.nu)
        if sb < 1e-3:
            sa = stats.t.sf(self._z(self.t_prime), self.nu)
            return stats.t.isf(sb + (sa - sb) * (1 - p), self.nu), sa - sb
        a, b = self._mass()
        return stats.t.ppf(a + (b - a) * p, self.nu), b - a

    def log_quantile(self, p) -> np.ndarray:
        """ln Q(p), exact (scipy)."""
        return math.log(self.t_prime) + self.scale * self._z_of(p)[0]

    def log_quantile_slope(self, p) -> np.ndarray:
        """d ln Q / dp = s·(F(b) − F(a)) / f_ν(F_ν⁻¹(·)): the derivative of the inverse CDF (exact, scipy)."""
        z, mass = self._z_of(p)
        return self.scale * mass / stats.t.pdf(z, self.nu)


QUANTILE_TOL = 1e-8  # largest |Δ ln t| allowed between the table and the exact quantile (float32 ulp: 6e-8 relative)
TABLE_SIZES = tuple(2**k + 1 for k in range(12, 21))  # tried in turn by `log_quantile_table`


@dataclass(frozen=True)
class QuantileTable:
    """ln Q(p) on a uniform grid of p in [0, 1] with its exact slopes, evaluated by cubic Hermite interpolation."""

    values: np.ndarray  # [K] float64, ln Q(k/(K − 1))
    slopes: np.ndarray  # [K] float64, d ln Q / dp at the same points

    def log_quantile(self, u) -> np.ndarray:
        """Cubic Hermite interpolation of ln Q at u ∈ [0, 1] (float64)."""
        K = self.values.size
        x = np.asarray(u, dtype=np.float64) * (K - 1)
        k = np.clip(np.floor(x), 0, K - 2).astype(np.intp)
        s, h = x - k, 1.0 / (K - 1)
        y0, y1 = self.values[k], self.values[k + 1]
        m0, m1 = self.slopes[k] * h, self.slopes[k + 1] * h
        s2 = s * s
        s3 = s2 * s
        return (2 * s3 - 3 * s2 + 1) * y0 + (s3 - 2 * s2 + s) * m0 + (3 * s2 - 2 * s3) * y1 + (s3 - s2) * m1


def build_quantile_table(dist: TruncatedLogStudentT, size: int) -> tuple[QuantileTable, float]:
    """The table of `dist` on `size` points and its largest |Δ ln Q| against the exact quantile at the quarter,
    half and three-quarter points of every interval."""
    p = np.linspace(0.0, 1.0, size)
    table = QuantileTable(dist.log_quantile(p), dist.log_quantile_slope(p))
    probe = (p[:-1, None] + np.array([0.25, 0.5, 0.75]) / (size - 1)).ravel()
    return table, float(np.abs(table.log_quantile(probe) - dist.log_quantile(probe)).max())


@functools.lru_cache(maxsize=32)
def log_quantile_table(dist: TruncatedLogStudentT) -> QuantileTable | None:
    """The smallest table of TABLE_SIZES (4097, 8193, ... 2^20 + 1 points) within QUANTILE_TOL of ln Q; built once per
    distribution (cached). None if none is (e.g. scale 0.2 with ν ≥ 5 at T = 80): `sample` then calls scipy."""
    for size in TABLE_SIZES:
        table, err = build_quantile_table(dist, size)
        if err <= QUANTILE_TOL:
            return table
    return None


def n_boundary(batch: int, rho: float) -> int:
    """TCM Algorithm 1, line 4: N_B boundary samples per (global) batch, int(B·ρ) as the official code
    (docs/decisions.md §5; e.g. B = 100, ρ = 0.29 gives 28). The one place N_B is computed."""
    return int(batch * rho)


def tcm_times(batch: int, t_prime: float, rho: float, psi_bar: TruncatedLogStudentT,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """TCM Eq. (7) / Algorithm 1, lines 6–7: N_B rows at t = t′ (boundary), the other B − N_B rows from ψ̄_t.

    Returns (t [B], is_boundary [B] bool). The boundary rows sit at random positions of the batch (a permutation
    drawn from `generator`), so that every data-parallel rank's slice holds about ρ of them (docs/decisions.md §5).
    """
    nb = n_boundary(batch, rho)
    is_boundary = torch.zeros(batch, dtype=torch.bool)
    is_boundary[torch.randperm(batch, generator=generator)[:nb]] = True
    t = torch.empty(batch)
    t[is_boundary] = float(t_prime)
    t[~is_boundary] = psi_bar.sample(batch - nb, generator)
    return t, is_boundary
