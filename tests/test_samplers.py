import pytest
import torch

from tcmlab.samplers import edm_times, generate, heun, sample


def test_one_and_two_step_follow_app_e():
    calls = []

    def f(x, t):
        calls.append((float(t[0]), float(x.std())))
        return torch.zeros_like(x)

    g = torch.Generator().manual_seed(0)
    x_T = 80.0 * torch.randn(512, 2, generator=g)
    seen = []
    out = sample(f, x_T, [80.0, 1.0], generator=g, callback=seen.append)
    assert [c[0] for c in calls] == [80.0, 1.0]
    assert calls[1][1] == pytest.approx(1.0, rel=0.1)  # re-noised: previous output (0) + t_mid·ε
    assert [s["i"] for s in seen] == [0, 1] and seen[0]["x"].dtype == torch.float64
    assert torch.equal(out, torch.zeros(512, 2))


def test_stage2_model_refuses_t_mid_below_t_prime():
    f = lambda x, t: x
    with pytest.raises(ValueError, match="dividing time t'=1"):
        generate(f, 4, (2,), (80.0, 0.821), t_prime=1.0)
    assert generate(f, 4, (2,), (80.0, 1.0), t_prime=1.0).shape == (4, 2)


@pytest.mark.parametrize("ts", [[], [1.0, 80.0], [80.0, -1.0]])
def test_bad_time_grids(ts):
    with pytest.raises(ValueError, match="sampling times"):
        sample(lambda x, t: x, torch.zeros(2, 2), ts)


def test_edm_times_are_eq_5():
    import numpy as np
    ts = edm_times(18).numpy()
    rho = 7.0
    expected = np.linspace(80.0 ** (1 / rho), 0.002 ** (1 / rho), 18) ** rho  # EDM Eq. (5), written another way
    np.testing.assert_allclose(ts, expected, rtol=1e-12)
    assert ts[0] == pytest.approx(80.0) and ts[-1] == pytest.approx(0.002)
    for bad, match in (({"num_steps": 1}, "num_steps >= 2"), ({"num_steps": 18.0}, "integer num_steps"),
                       ({"t_min": 90.0}, "t_min < t_max"), ({"rho": 0.0}, "rho > 0")):
        with pytest.raises(ValueError, match=match):
            edm_times(**{"num_steps": 18, **bad})


def test_heun_solves_the_probability_flow_ode_of_a_gaussian():
    """Data N(0, s²): the exact denoiser is D(x, t) = s²/(s² + t²)·x and the ODE dx/dt = (x − D)/t carries x_T to
    x_0 = x_T·s/√(T² + s²) (x/√(t² + s²) is constant along it). Heun on EDM's grid converges there
    at second order (4× the times, ~16× less error); an Euler-only loop converges at first order."""
    s, T = 0.5, 80.0
    calls = []

    def D(x, t):
        calls.append(float(t[0]))
        return s**2 / (s**2 + t[:, None] ** 2) * x

    x_T = T * torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
    exact = x_T * s / (T**2 + s**2) ** 0.5
    err = {}
    for n in (50, 200):
        calls.clear()
        out = heun(D, x_T, edm_times(n))
        err[n] = float(((out - exact) / exact).abs().max())
        assert len(calls) == 2 * n - 1 and calls[-1] == pytest.approx(0.002)
    assert out.dtype == torch.float32
    assert err[200] < 1e-3 and err[200] / err[50] < 0.1
    seen = []
    heun(D, x_T, [80.0, 1.0], callback=seen.append)
    assert [(c["i"], c["t"]) for c in seen] == [(0, 80.0), (1, 1.0)] and seen[0]["x"].dtype == torch.float64
    assert torch.allclose(seen[1]["denoised"], s**2 / (s**2 + 1.0) * seen[1]["x"])


def test_heun_refuses_a_truncated_model():
    with pytest.raises(ValueError, match="not a denoiser"):
        heun(lambda x, t: x, torch.zeros(2, 2), [80.0, 1.0], t_prime=1.0)


class DeviceRecorder(torch.nn.Module):
    """A network whose weights live on `device`; records where its inputs arrive, returns zeros on the CPU."""

    def __init__(self, device):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, device=device))
        self.seen = []

    def forward(self, x, t):
        self.seen.append((x.device.type, t.device.type))
        return torch.zeros(x.shape)


def test_functions_that_run_a_network_take_its_device():
    from tcmlab import metrics
    from tcmlab.samplers import generate
    f = DeviceRecorder("meta")
    generate(f, 3, (1, 8, 8), (80.0,), generator=torch.Generator().manual_seed(0))
    metrics.denoise(f, torch.zeros(2, 1, 8, 8), 1.0)
    assert f.seen == [("meta", "meta")] * 2


def test_rng_states_load_on_the_cpu_whatever_the_map_location(ci_runs):
    from tcmlab import checkpoint
    state = checkpoint.load(ci_runs / "s1" / "latest.safetensors", device="meta")
    assert next(iter(state["model"].values())).device.type == "meta"
    torch.set_rng_state(state["rng"]["torch"][0])  # would raise for a meta (or CUDA) tensor
    torch.Generator().set_state(state["rng"]["data"])
