import math

import numpy as np
import pytest
import torch

from tcmlab.schedules import (LogNormal, TruncatedLogStudentT, delta_t, ect_r, ect_ratio, inverse_sqrt_lr, n_boundary,
                              tcm_times)


@pytest.mark.parametrize("i, expected", [(0, 0.5), (24_999, 0.5), (25_000, 0.75), (50_000, 0.875),
                                         (225_000, 0.999), (250_000, 0.999)])
def test_ect_ratio_cifar(i, expected):
    # TCM App. E with the official code's min / floor(i/d)+1: starts at 1 - 1/q, capped at 0.999.
    assert ect_ratio(i, q=2, d=25_000, ratio_max=0.999) == pytest.approx(expected)


def test_ect_ratio_imagenet_cap():
    assert ect_ratio(0, q=4, d=25_000, ratio_max=0.9961) == pytest.approx(0.75)
    assert ect_ratio(100_000, q=4, d=25_000, ratio_max=0.9961) == pytest.approx(0.9961)


def test_delta_t_values():
    # Δt = (1 + 8·sigmoid(-t))·(1 - ratio)·t ; at t' = 1, ratio 0.999: 0.00315 (docs/decisions.md §2)
    dt = delta_t(torch.tensor([1.0]), 0.999)
    assert float(dt) == pytest.approx((1 + 8 / (1 + math.e)) * 0.001, rel=1e-5)
    assert float(dt) == pytest.approx(0.00315, abs=1e-5)
    dt_in = delta_t(torch.tensor([1.0]), 0.9961)
    assert 1 - float(dt_in) == pytest.approx(0.98771, abs=1e-5)


def test_delta_t_clamps_r():
    t = torch.tensor([0.002, 0.01, 0.1])
    r = ect_r(t, 0.5)  # at ratio 0.5 and small t, (1+8σ(-t))·0.5 > 1, so r would be negative
    assert torch.all(r >= 1e-6) and torch.all(r < t)
    assert torch.all(delta_t(t, 0.5) > 0)


def test_log_student_t_quantiles_match_reference():
    psi = TruncatedLogStudentT(t_prime=1.0, t_max=80.0, scale=0.2, nu=0.01)
    assert psi.quantile(0.5) == pytest.approx(1.22, abs=0.01)
    assert psi.quantile(0.9) == pytest.approx(10.5, rel=0.03)
    assert psi.quantile(0.99) == pytest.approx(61.3, rel=0.03)
    assert psi.cdf(2.0) == pytest.approx(0.70, abs=0.01)
    t = psi.sample(200_000, torch.Generator().manual_seed(0))
    assert float(t.min()) >= 1.0 and float(t.max()) <= 80.0
    assert float(t.median()) == pytest.approx(1.22, abs=0.02)
    assert float((t < 2).float().mean()) == pytest.approx(0.70, abs=0.01)


@pytest.mark.parametrize("dist", [TruncatedLogStudentT(), TruncatedLogStudentT(1.5, 80.0, 0.5, 2.0),
                                  LogNormal(), LogNormal(-1.2, 1.2)])
def test_pdf_integrates_to_one_and_matches_cdf(dist):
    lo = getattr(dist, "t_min", getattr(dist, "t_prime", None))
    t = np.geomspace(lo, dist.t_max, 200_001)
    p = dist.pdf(t)
    assert np.trapezoid(p, t) == pytest.approx(1.0, abs=2e-3)
    mid = t[100_000]
    assert np.trapezoid(p[:100_001], t[:100_001]) == pytest.approx(float(dist.cdf(mid)), abs=2e-3)
    assert dist.pdf(dist.t_max * 1.01) == 0


def test_lognormal_truncated_support():
    t = LogNormal(-1.1, 2.0, 0.002, 80.0).sample(100_000, torch.Generator().manual_seed(1))
    assert float(t.min()) >= 0.002 and float(t.max()) <= 80.0
    assert float(torch.log(t).mean()) == pytest.approx(-1.1, abs=0.05)


@pytest.mark.parametrize("dist", [LogNormal(), LogNormal(-1.2, 1.2), LogNormal(0.3, 0.7, 0.01, 20.0)])
def test_lognormal_draw_is_scipys_exact_inverse_cdf_without_calling_scipy(dist, monkeypatch):
    # t = exp(mean + std·Φ⁻¹(a + (b − a)·u)) from the generator's float64 uniforms: torch's ndtri must give scipy's
    # norm.ppf draw in float32 (a training step then makes no scipy call once the truncation mass is cached).
    from scipy import stats

    from tcmlab import schedules
    n = 200_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64).numpy()
    a, b = stats.norm.cdf((np.log([dist.t_min, dist.t_max]) - dist.mean) / dist.std)
    exact = np.clip(np.exp(dist.mean + dist.std * stats.norm.ppf(a + (b - a) * u)), dist.t_min, dist.t_max)
    dist.sample(1)  # caches (a, b)
    monkeypatch.setattr(schedules, "stats", None)  # any scipy call now raises
    t = dist.sample(n, torch.Generator().manual_seed(5))
    assert t.dtype == torch.float32 and torch.equal(t, torch.from_numpy(exact).float())


def test_ect_ratio_never_overflows():
    # `ci` has d = 5 → ⌊i/d⌋ + 1 passes 1023 at i ≈ 5,115; q^(k) overflowed a float there.
    assert ect_ratio(5_115, q=2, d=5, ratio_max=0.99) == 0.99
    assert ect_ratio(10**9, q=2, d=1, ratio_max=0.999) == 0.999
    assert ect_ratio(10**9, q=4, d=1, ratio_max=0.9961) == 0.9961


def test_tcm_times_partition():
    assert n_boundary(1024, 0.25) == 256 and n_boundary(10, 0.25) == 2
    assert n_boundary(100, 0.29) == 28  # int(B·ρ) as the official code (a floor with an epsilon gave 29)
    t, b = tcm_times(10, 1.0, 0.25, TruncatedLogStudentT(), torch.Generator().manual_seed(0))
    assert b.sum() == 2 and torch.all(t[b] == 1.0) and torch.all(t[~b] > 1.0)
    t, b = tcm_times(100, 1.0, 0.29, TruncatedLogStudentT(), torch.Generator().manual_seed(0))
    assert b.sum() == 28


def test_boundary_rows_are_spread_over_data_parallel_ranks():
    # CIFAR stage 2 on 8 GPUs: B = 1024, N_B = 256. Each rank's slice must hold ≈ ρ boundary rows, not all or none.
    g = torch.Generator().manual_seed(0)
    share = torch.zeros(8)
    for _ in range(20):
        _, b = tcm_times(1024, 1.0, 0.25, TruncatedLogStudentT(), g)
        assert int(b.sum()) == 256
        per_rank = b.reshape(8, 128).float().mean(1)
        assert float(per_rank.min()) > 0.1 and float(per_rank.max()) < 0.4
        share += per_rank / 20
    assert torch.allclose(share, torch.full((8,), 0.25), atol=0.03)
    _, b2 = tcm_times(1024, 1.0, 0.25, TruncatedLogStudentT(), g)
    assert not torch.equal(b, b2)  # new positions every step


def test_inverse_sqrt_lr():
    assert inverse_sqrt_lr(0, 5e-4, 8000) == 5e-4
    assert inverse_sqrt_lr(32_000, 5e-4, 8000) == pytest.approx(2.5e-4)
    assert inverse_sqrt_lr(10**6, 1e-4, 0) == 1e-4


@pytest.mark.parametrize("kw, field", [(dict(t_prime=0.0), "t_prime"), (dict(t_prime=80.0), "t_prime"),
                                       (dict(scale=0.0), "scale"), (dict(nu=-1.0), "nu")])
def test_psi_rejects_bad_values(kw, field):
    with pytest.raises(ValueError, match=field):
        TruncatedLogStudentT(**kw)


PSIS = [TruncatedLogStudentT(), TruncatedLogStudentT(1.5, 80.0, 0.5, 2.0), TruncatedLogStudentT(0.5, 80.0, 0.2, 0.01)]


@pytest.mark.parametrize("psi", PSIS)
def test_psi_sample_is_the_exact_inverse_cdf_to_float32(psi):
    # The sampler interpolates a cached table of ln Q; each draw must equal Q(u) of the exact (scipy) quantile at the
    # same float64 uniform u to float32 rounding, so the sampled distribution is ψ̄ itself (TCM Eq. 7).
    n = 20_000
    t = psi.sample(n, torch.Generator().manual_seed(5)).double().numpy()
    u = torch.rand(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64).numpy()
    exact = np.clip(psi.quantile(u), psi.t_prime, psi.t_max)
    assert np.abs(np.log(t) - np.log(exact)).max() <= 1.2e-7  # float32 rounding (6e-8) + table (1e-8)
    steps = np.abs(t.astype(np.float32).view(np.int32) - exact.astype(np.float32).view(np.int32))
    assert np.mean(steps == 0) > 0.99 and steps.max() <= 1  # the float32 of the exact draw, or one float32 step off
    if psi == TruncatedLogStudentT():
        assert steps.max() == 0  # the paper's ψ̄: the same draws as the exact (scipy) inverse CDF


def test_psi_samples_follow_the_paper_psi_bar():
    # Kolmogorov–Smirnov against ψ̄'s CDF (ln t = ln t′ + 0.2·Z, Z ~ t(0.01), truncated to [1, 80]): 200k draws.
    from scipy import stats
    psi = TruncatedLogStudentT(1.0, 80.0, 0.2, 0.01)
    t = psi.sample(200_000, torch.Generator().manual_seed(11)).double().numpy()
    ks = stats.kstest(t, psi.cdf)
    assert ks.statistic < 0.004 and ks.pvalue > 1e-3
    wrong = TruncatedLogStudentT(1.0, 80.0, 0.25, 0.01)  # the test can tell a nearby distribution apart
    assert stats.kstest(t, wrong.cdf).pvalue < 1e-6


def test_quantile_table_is_cached_and_within_tolerance():
    from tcmlab.schedules import QUANTILE_TOL, build_quantile_table, log_quantile_table
    psi = TruncatedLogStudentT()
    assert log_quantile_table(psi) is log_quantile_table(TruncatedLogStudentT(1.0, 80.0, 0.2, 0.01))
    assert log_quantile_table(psi).values.size == 4097
    table, err = build_quantile_table(psi, 4097)
    assert err <= QUANTILE_TOL
    coarse, err_coarse = build_quantile_table(psi, 65)
    assert err_coarse > QUANTILE_TOL  # the probe sees interpolation error where there is some
    p = np.array([0.0, 0.3, 0.77, 1.0])
    assert np.allclose(table.log_quantile(p), psi.log_quantile(p), rtol=0, atol=1e-12)  # exact at grid points


def test_log_quantile_slope_is_the_derivative():
    psi = TruncatedLogStudentT(1.5, 80.0, 0.5, 2.0)
    p, h = np.array([0.01, 0.3, 0.9, 0.99]), 1e-6
    fd = (psi.log_quantile(p + h) - psi.log_quantile(p - h)) / (2 * h)
    assert np.allclose(psi.log_quantile_slope(p), fd, rtol=1e-6)


def test_without_a_table_within_tolerance_psi_draws_the_exact_inverse_cdf(monkeypatch):
    from tcmlab import schedules
    monkeypatch.setattr(schedules, "TABLE_SIZES", (5, 9))
    psi = TruncatedLogStudentT(1.0, 80.0, 0.3, 0.7)  # not cached by another test
    assert schedules.log_quantile_table(psi) is None
    t = psi.sample(1000, torch.Generator().manual_seed(4))
    u = torch.rand(1000, generator=torch.Generator().manual_seed(4), dtype=torch.float64).numpy()
    assert torch.equal(t, torch.from_numpy(psi.quantile(u)).clamp(1.0, 80.0).float())


@pytest.mark.parametrize("nu", [5.0, 10.0, 1e4])
def test_psi_with_large_nu_reaches_T_and_samples_its_cdf(nu):
    # F_ν(z(T)) rounds to 1 for large ν at scale 0.2 (F_ν⁻¹(1) = inf): the quantile comes from the survival function
    from scipy import stats
    psi = TruncatedLogStudentT(1.0, 80.0, 0.2, nu)
    assert psi.log_quantile(np.array([0.0, 1.0])) == pytest.approx([0.0, math.log(80.0)], abs=1e-9)
    p = np.array([0.1, 0.5, 0.9, 0.999999])
    assert np.allclose(psi.cdf(psi.quantile(p)), p, rtol=0, atol=1e-9)
    t = psi.sample(20_000, torch.Generator().manual_seed(12)).double().numpy()
    assert np.isfinite(t).all() and stats.kstest(t, psi.cdf).pvalue > 1e-3
