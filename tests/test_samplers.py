import pytest
import torch

from tcmlab.samplers import generate, sample


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
