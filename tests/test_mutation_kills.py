"""Tests written to kill mutants that survived `make mutate` (docs/testing.md): each pins a property of
losses / schedules / precond / samplers that the other unit tests left open. Expected values come from the paper's
formulas (TCM Eq. 3/4/5/6/10/11, App. E; EDM) written out here, not from the library's own helpers."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from tcmlab.losses import consistency_weight, ect_loss, edm_loss, tcm_loss, tcm_targets
from tcmlab.precond import Precond
from tcmlab.samplers import check_times, generate, sample
from tcmlab.schedules import (LogNormal, TruncatedLogStudentT, delta_t, ect_r, ect_ratio, inverse_sqrt_lr,
                              tcm_times)


def batch(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, 2, 2, generator=g), torch.randn(B, 1, 2, 2, generator=g)


def sigmoid(v):
    return 1 / (1 + math.exp(-v))


def ref_r(t, ratio):
    """TCM App. E, written out: r = max(t − (1 + 8·sigmoid(−t))·(1 − ratio)·t, 1e-6)."""
    return max(t - (1 + 8 * sigmoid(-t)) * (1 - ratio) * t, 1e-6)


# ---------------------------------------------------------------------------------------------------- precond

class Probe(nn.Module):
    """F(x_in, c_noise) = 2·x_in + c_noise; records what it was called with."""

    def forward(self, x_in, c_noise):
        self.x_in, self.c_noise = x_in.detach().clone(), c_noise.detach().clone()
        return 2 * x_in + c_noise.reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("sd", [0.5, 1.3])
def test_precond_is_eq3_with_edm_scalings(sd):
    x, _ = batch(3)
    t = torch.tensor([0.2, 1.0, 7.0])
    F = Probe()
    out = Precond(F, sigma_data=sd)(x, t)
    xd = x.double()
    for k, tk in enumerate(t.tolist()):
        c_skip = sd**2 / (tk**2 + sd**2)
        c_out = tk * sd / math.sqrt(tk**2 + sd**2)
        c_in = 1 / math.sqrt(tk**2 + sd**2)
        c_noise = math.log(tk) / 4
        assert torch.allclose(F.x_in[k].double(), c_in * xd[k], rtol=1e-6)
        assert F.c_noise[k].item() == pytest.approx(c_noise, rel=1e-6)
        expected = c_skip * xd[k] + c_out * (2 * c_in * xd[k] + c_noise)
        assert torch.allclose(out[k].double(), expected, rtol=1e-5, atol=1e-6)


def test_precond_works_in_float32_whatever_the_input_and_net_dtypes():
    x, _ = batch(3)
    t = torch.tensor([0.2, 1.0, 7.0])
    F = Probe()
    f = Precond(F)
    ref = f(x, t)
    out = f(x.double(), t)  # float64 data
    assert F.x_in.dtype == torch.float32 and out.dtype == torch.float32
    assert torch.allclose(out, ref)
    out = f(x, t.double())  # float64 noise levels
    assert F.c_noise.dtype == torch.float32 and out.dtype == torch.float32
    assert torch.allclose(out, ref)
    out = Precond(lambda x_in, c: F(x_in, c).double())(x, t)  # a net that answers in float64
    assert out.dtype == torch.float32 and torch.allclose(out, ref)


class MatmulProbe(nn.Module):
    """Records the dtype a matmul runs in (the autocast dtype, if autocast is on) and whether autocast is on."""

    def forward(self, x_in, c_noise):
        self.mm_dtype = torch.mm(x_in.flatten(1), x_in.flatten(1).T).dtype
        self.autocast = torch.is_autocast_enabled(x_in.device.type)
        return x_in * 0 + 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_precond_autocast_runs_only_the_net_in_the_requested_dtype(dtype):
    x, _ = batch(3)
    F = MatmulProbe()
    out = Precond(F, autocast_dtype=dtype)(x, torch.tensor([0.2, 1.0, 7.0]))
    assert F.autocast and F.mm_dtype == dtype
    assert out.dtype == torch.float32


def test_precond_without_autocast_is_plain_float32_and_silent():
    x, _ = batch(3)
    F = MatmulProbe()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "In CPU autocast, but the target dtype is not supported"
        out = Precond(F)(x, torch.tensor([0.2, 1.0, 7.0]))
    assert not F.autocast and F.mm_dtype == torch.float32 and out.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------- samplers

def test_check_times_rejects_zero_repeats_and_any_increase():
    for ts in ([1.0, 0.0], [80.0, 80.0], [80.0, 1.0, 2.0], [80.0, 10.0, 10.0, 1.0]):
        with pytest.raises(ValueError, match="sampling times"):
            check_times(ts)
    assert check_times([80.0, 10.0, 1.0]).tolist() == [80.0, 10.0, 1.0]


def test_time_grid_is_float64():
    assert check_times([80.0, 0.3]).dtype == torch.float64
    seen = []
    sample(lambda x, t: x, torch.zeros(2, 2), [80.0, 0.3], callback=seen.append,
           generator=torch.Generator().manual_seed(0))
    assert [s["t"] for s in seen] == [80.0, 0.3]  # 0.3 exactly, not float32(0.3) = 0.30000001192...


def test_generate_is_x_T_then_renoise_from_the_generator():
    # x_T = ts[0]·z; x = f(x_T, T); x = f(x + t_mid·ε, t_mid), z and ε float64 draws from `generator` in that order.
    n, shape, T, t_mid = 20, (3,), 80.0, 0.7
    out = generate(lambda x, t: x, n, shape, (T, t_mid), generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    z = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    eps = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    assert torch.allclose(out.double(), T * z + t_mid * eps, rtol=1e-6, atol=1e-5)
    one = generate(lambda x, t: x, n, shape, (T,), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(one.double(), T * z, rtol=1e-6)


def test_generate_batches_and_passes_the_callback():
    seen = []
    out = generate(lambda x, t: x, 5, (2,), (80.0, 1.0), callback=seen.append, batch=2,
                   generator=torch.Generator().manual_seed(0))
    assert out.shape == (5, 2)
    assert [(s["i"], s["t"], s["x"].shape[0]) for s in seen] == [(0, 80.0, 2), (1, 1.0, 2), (0, 80.0, 2),
                                                                 (1, 1.0, 2), (0, 80.0, 1), (1, 1.0, 1)]


def test_generate_validates_the_grid_before_any_work():
    with pytest.raises(ValueError, match="dividing time"):
        generate(lambda x, t: x, 0, (2,), (80.0, 0.5), t_prime=1.0)


class Stop(Exception):
    pass


class DeviceProbe(nn.Module):
    """Weights on the CPU; records the devices of its inputs, then stops the sampler (meta tensors hold no data)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x, t):
        self.devices = (x.device, t.device)
        raise Stop


def test_generate_runs_the_net_on_the_device_it_is_given():
    # device=None (where the weights live): tests/test_samplers.py::test_functions_that_run_a_network_take_its_device
    f = DeviceProbe()
    with pytest.raises(Stop):
        generate(f, 2, (3,), (80.0,), device="meta")
    assert f.devices == (torch.device("meta"), torch.device("meta"))


# ---------------------------------------------------------------------------------------------------- schedules

def test_delta_t_and_r_at_t_other_than_one():
    for ratio in (0.5, 0.99, 0.999):
        t = torch.tensor([0.002, 0.05, 0.5, 2.0, 10.0, 80.0], dtype=torch.float64)
        r = ect_r(t, ratio)
        assert torch.allclose(r, torch.tensor([ref_r(v, ratio) for v in t.tolist()], dtype=torch.float64),
                              rtol=1e-12, atol=0)
        assert torch.allclose(delta_t(t, ratio), t - r, rtol=1e-12, atol=0)
    # unclamped: Δt = (1 + 8·sigmoid(−t))·(1 − ratio)·t, linear in t for large t
    assert float(delta_t(torch.tensor(80.0, dtype=torch.float64), 0.999)) == pytest.approx(
        (1 + 8 * sigmoid(-80.0)) * 0.001 * 80.0, rel=1e-9)


def test_ect_ratio_rejects_negative_iterations():
    with pytest.raises(ValueError, match="iteration i must be >= 0"):
        ect_ratio(-1, q=2, d=10, ratio_max=0.999)


def test_inverse_sqrt_lr_with_t_ref_one():
    assert inverse_sqrt_lr(4, 1.0, 1) == pytest.approx(0.5)
    assert inverse_sqrt_lr(1, 1.0, 1) == 1.0


def test_lognormal_rejects_bad_values():
    for kw, field in ((dict(std=0.0), "std"), (dict(std=-1.0), "std"), (dict(t_min=0.0), "t_min"),
                      (dict(t_min=5.0, t_max=5.0), "t_min")):
        with pytest.raises(ValueError, match=field):
            LogNormal(**kw)
    assert LogNormal(std=0.5).std == 0.5


def test_psi_rejects_nu_zero():
    with pytest.raises(ValueError, match="nu"):
        TruncatedLogStudentT(nu=0.0)


DISTS = [LogNormal(), LogNormal(0.3, 0.7, 0.01, 20.0),
         TruncatedLogStudentT(), TruncatedLogStudentT(1.5, 80.0, 0.5, 2.0)]


def lo_of(dist):
    return getattr(dist, "t_min", getattr(dist, "t_prime", None))


@pytest.mark.parametrize("dist", DISTS)
def test_sample_is_the_inverse_cdf_of_float64_uniforms_from_the_generator(dist):
    n = 64
    t = dist.sample(n, torch.Generator().manual_seed(3))
    u = torch.rand(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64).numpy()
    lo, hi = dist.cdf(lo_of(dist)), dist.cdf(dist.t_max)
    assert (lo, hi) == (0.0, 1.0)
    assert np.allclose(dist.cdf(t.double().numpy()), u, atol=1e-5)  # truncated: F(t_i) = u_i, uniform on [0, 1]


@pytest.mark.parametrize("dist", DISTS)
def test_pdf_support_is_closed_and_cdf_saturates_outside(dist):
    lo = lo_of(dist)
    for edge in (lo, dist.t_max):
        assert dist.pdf(edge) > 0
        assert dist.pdf(edge) == pytest.approx(dist.pdf(edge * (1 + 1e-9)) if edge == lo else
                                               dist.pdf(edge * (1 - 1e-9)), rel=1e-6)
    assert dist.cdf(lo / 10) == 0 and dist.cdf(dist.t_max * 10) == 1
    assert np.all(dist.cdf([lo / 2, lo, dist.t_max, 2 * dist.t_max]) == [0, 0, 1, 1])


@pytest.mark.parametrize("dist", DISTS)
def test_pdf_and_cdf_evaluate_float32_input_in_float64(dist):
    # e.g. `dist.pdf(t.numpy())` on a float32 sample: the same numbers, the same densities as in float64
    t32 = np.array([1.5, 2.7, 5.3, 11.1, 60.1], dtype=np.float32)
    t64 = t32.astype(np.float64)
    assert np.allclose(dist.pdf(t32), dist.pdf(t64), rtol=1e-12, atol=0)
    assert np.allclose(dist.cdf(t32), dist.cdf(t64), rtol=1e-12, atol=0)


def test_log_student_t_cdf_with_t_prime_other_than_one():
    # ln t = ln t′ + s·Z, Z ~ t(ν), truncated to [t′, T]:
    # F(t) = (T_ν(z(t)) − T_ν(0)) / (T_ν(z(T)) − T_ν(0)), z(t) = (ln t − ln t′)/s
    tp, T, s, nu = 1.5, 80.0, 0.5, 2.0
    psi = TruncatedLogStudentT(tp, T, s, nu)
    zT = (math.log(T) - math.log(tp)) / s
    for t in (1.6, 2.5, 7.0, 30.0):
        expected = (stats.t.cdf((math.log(t) - math.log(tp)) / s, nu) - 0.5) / (stats.t.cdf(zT, nu) - 0.5)
        assert float(psi.cdf(t)) == pytest.approx(expected, rel=1e-9)
        assert float(psi.quantile(expected)) == pytest.approx(t, rel=1e-9)


def test_tcm_times_are_reproducible_from_the_generator():
    psi = TruncatedLogStudentT()
    t1, b1 = tcm_times(64, 1.0, 0.25, psi, torch.Generator().manual_seed(7))
    t2, b2 = tcm_times(64, 1.0, 0.25, psi, torch.Generator().manual_seed(7))
    assert torch.equal(t1, t2) and torch.equal(b1, b2)
    t3, b3 = tcm_times(64, 1.0, 0.25, psi, torch.Generator().manual_seed(8))
    assert not torch.equal(b1, b3) and not torch.equal(t1[~b1], t3[~b3])


# ---------------------------------------------------------------------------------------------------- losses

def test_cout_sq_weighting_is_one_over_c_out_squared():
    t = torch.tensor([0.01, 0.3, 1.0, 5.0, 80.0], dtype=torch.float64)
    r = ect_r(t, 0.99)
    for sd in (0.5, 1.3):
        expected = torch.tensor([(v**2 + sd**2) / (v * sd) ** 2 for v in t.tolist()], dtype=torch.float64)
        w = consistency_weight(t, r, "cout_sq", sigma_data=sd) if sd != 0.5 else consistency_weight(t, r, "cout_sq")
        assert torch.allclose(w, expected, rtol=1e-12)


class Affine(nn.Module):
    """f(y, t) = a·y + b (+ a trainable zero); records every call (input, t, grad enabled)."""

    def __init__(self, a, b, trainable=True):
        super().__init__()
        self.a, self.b = a, b
        self.w = nn.Parameter(torch.tensor(0.0), requires_grad=trainable)
        self.calls = []

    def forward(self, y, t):
        self.calls.append((y.detach().clone(), t.detach().clone(), torch.is_grad_enabled()))
        return self.a * y + self.b + self.w


def test_edm_loss_values():
    # λ(t)·‖f(x + tε, t) − x‖² summed over pixels, λ(t) = (t² + σ_d²)/(t·σ_d)²
    x, eps = batch(4)
    t = torch.tensor([0.1, 0.5, 2.0, 10.0])
    f = Affine(0.5, -0.1)
    out = edm_loss(f, x, eps, t)
    (y, t_seen, _), = f.calls
    assert torch.allclose(y, x + t.reshape(-1, 1, 1, 1) * eps) and torch.equal(t_seen, t)
    xd, ed = x.double(), eps.double()
    per = [(tk**2 + 0.25) / (tk * 0.5) ** 2 * float(((0.5 * (xd[k] + tk * ed[k]) - 0.1 - xd[k]) ** 2).sum())
           for k, tk in enumerate(t.tolist())]
    assert torch.allclose(out.per_sample.double(), torch.tensor(per, dtype=torch.float64), rtol=1e-5)
    assert out.loss.item() == pytest.approx(sum(per) / 4, rel=1e-5)
    assert torch.equal(out.t, t)
    assert edm_loss(f, x, eps, t, n_total=10).loss.item() == pytest.approx(sum(per) / 10, rel=1e-5)
    one = edm_loss(f, x[:1], eps[:1], t[:1])  # a batch of one: the mean is the value itself
    assert one.loss.item() == pytest.approx(per[0], rel=1e-5)


def test_ect_loss_target_comes_from_f_minus_and_reports_t_r():
    x, eps = batch(4)
    t = torch.tensor([0.1, 0.5, 2.0, 10.0])
    ratio, c = 0.9, 0.03
    f, f_minus = Affine(1.0, 0.0), Affine(1.0, 0.0, trainable=False)
    f_minus.b = 0.25  # the unwrapped copy answers differently, so the target's origin is visible
    out = ect_loss(f, x, eps, t, ratio, c, "inv_dt", f_minus=f_minus)
    r = torch.tensor([ref_r(v, ratio) for v in t.tolist()])
    assert torch.equal(out.t, t) and torch.allclose(out.r, r)
    assert len(f.calls) == 1 and len(f_minus.calls) == 1 and not f_minus.calls[0][2]
    assert torch.allclose(f_minus.calls[0][0], x + r.reshape(-1, 1, 1, 1) * eps, atol=1e-6)
    # d(x + tε, x + rε + 0.25) per sample, / (t − r)
    diff = (t - r).reshape(-1, 1, 1, 1) * eps - 0.25
    per = ((diff.double() ** 2).flatten(1).sum(1) + c * c).sqrt() - c
    per = per / (t - r).double()
    assert torch.allclose(out.per_sample.double(), per, rtol=1e-4)
    assert out.loss.item() == pytest.approx(float(per.mean()), rel=1e-4)
    out10 = ect_loss(f, x, eps, t, ratio, c, "inv_dt", n_total=10, f_minus=f_minus)
    assert out10.loss.item() == pytest.approx(float(per.sum()) / 10, rel=1e-4)


def test_tcm_loss_inputs_targets_and_fields():
    # Student on x + tε (with gradient); targets on x + rε (shared ε): θ0 where r < t′, else f_minus (Eq. 5/6).
    x, eps = batch(6)
    t = torch.tensor([1.0, 1.0, 1.001, 1.5, 3.0, 20.0])
    is_b = torch.tensor([True, True, False, False, False, False])
    ratio, t_prime = 0.99, 1.0
    f, f0, f_minus = Affine(1.0, 0.0), Affine(0.0, 1.0, trainable=False), Affine(0.0, 3.0, trainable=False)
    out = tcm_loss(f, f0, x, eps, t, is_b, t_prime, ratio, 1e-8, "inv_dt", 0.5, f_minus=f_minus)
    r = torch.tensor([ref_r(v, ratio) for v in t.tolist()])
    below = r < t_prime
    assert below.tolist() == [True, True, True, False, False, False]
    assert torch.equal(out.t, t) and torch.allclose(out.r, r) and torch.equal(out.is_boundary, is_b)
    assert out.teacher_rows == 3
    (y, t_seen, grad), = f.calls  # the student runs once, on every row, and never as the target
    assert grad and torch.allclose(y, x + t.reshape(-1, 1, 1, 1) * eps) and torch.equal(t_seen, t)
    y_r = x + r.reshape(-1, 1, 1, 1) * eps
    (y0, r0, g0), = f0.calls
    (ym, rm, gm), = f_minus.calls
    assert not g0 and not gm
    assert torch.allclose(y0, y_r[below], atol=1e-6) and torch.allclose(r0, r[below])
    assert torch.allclose(ym, y_r[~below], atol=1e-6) and torch.allclose(rm, r[~below])
    target = torch.where(below, 1.0, 3.0).reshape(-1, 1, 1, 1)
    per = ((x + t.reshape(-1, 1, 1, 1) * eps - target).double() ** 2).flatten(1).sum(1).sqrt() / (t - r).double()
    assert torch.allclose(out.per_sample.double(), per, rtol=1e-4)


@pytest.mark.parametrize("passes", ["routed", "full"])
def test_tcm_targets_route_r_equal_t_prime_to_the_student(passes):
    f, f0 = Affine(0.0, 2.0, trainable=False), Affine(0.0, 1.0, trainable=False)
    y = torch.zeros(4, 1, 2, 2)
    r = torch.tensor([1.0, 0.999, 1.001, 1.0])  # r = t′ lies in the student's domain [t′, T]
    target, n0 = tcm_targets(f, f0, y, r, 1.0, torch.get_rng_state(), passes)
    assert n0 == 1 and target.flatten(1)[:, 0].tolist() == [2.0, 1.0, 2.0, 2.0]


@pytest.mark.parametrize("passes", ["routed", "full"])
def test_tcm_targets_with_no_teacher_rows_and_float32_targets(passes):
    # Networks answer in float32 (as Precond does) whatever the input dtype; the targets stay float32 too.
    f_calls, f0_calls = [], []
    f = lambda y, r: f_calls.append(y.dtype) or torch.full(y.shape, 2.0)  # noqa: E731
    f0 = lambda y, r: f0_calls.append(y.dtype) or torch.full(y.shape, 1.0)  # noqa: E731
    y = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    target, n0 = tcm_targets(f, f0, y, torch.tensor([1.5, 2.0, 80.0]), 1.0, torch.get_rng_state(), passes)
    assert n0 == 0 and f_calls and not f0_calls
    assert target.dtype == torch.float32 and torch.all(target == 2.0)
    target, n0 = tcm_targets(f, f0, y, torch.tensor([0.5, 0.9, 0.99]), 1.0, torch.get_rng_state(), passes)
    assert n0 == 3 and torch.all(target == 1.0)


def test_tcm_targets_rejects_unknown_teacher_passes():
    f = Affine(0.0, 2.0, trainable=False)
    with pytest.raises(ValueError, match="teacher_passes"):
        tcm_targets(f, f, torch.zeros(2, 1, 2, 2), torch.tensor([0.5, 2.0]), 1.0, torch.get_rng_state(), "both")


def test_one_and_two_step_share_every_z_whatever_the_batch():
    # all z's first, then the ε's: the 2-step samples of a later batch start from the 1-step samples' z
    n, shape, T, t_mid = 20, (16,), 80.0, 0.7  # 16 values a row: torch's CPU randn stream splits at any row
    g = torch.Generator().manual_seed(5)
    z = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    eps = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    after = torch.randn(3, generator=g)
    for batch in (1024, 7):
        gen = torch.Generator().manual_seed(5)
        two = generate(lambda x, t: x, n, shape, (T, t_mid), generator=gen, batch=batch)
        assert torch.allclose(two.double(), T * z + t_mid * eps, rtol=1e-6, atol=1e-5)
        assert torch.equal(torch.randn(3, generator=gen), after)  # the generator left where one batch leaves it
        one = generate(lambda x, t: x, n, shape, (T,), generator=torch.Generator().manual_seed(5), batch=batch)
        assert torch.allclose(one.double(), T * z, rtol=1e-6)
