import torch

from tcmlab.nets import MLP
from tcmlab.precond import Precond, edm_scalings


def test_scalings_boundary_behaviour():
    c_skip, c_out, c_in, c_noise = edm_scalings(torch.tensor([1e-6, 0.5, 80.0]))
    assert abs(float(c_skip[0]) - 1) < 1e-9 and float(c_out[0]) < 1e-5  # f(x, t→0) → x
    assert abs(float(c_skip[1]) - 0.5) < 1e-7  # t = σ_data
    assert abs(float(c_out[2]) - 0.5 * 80 / (80**2 + 0.25) ** 0.5) < 1e-7
    assert abs(float(c_in[1]) - 1 / (0.5**0.5)) < 1e-6
    assert abs(float(c_noise[2]) - torch.log(torch.tensor(80.0)) / 4) < 1e-6


def test_precond_is_identity_at_tiny_t_for_any_net():
    torch.manual_seed(0)
    f = Precond(MLP((1, 8, 8), hidden=32, depth=1))
    x = torch.randn(4, 1, 8, 8)
    out = f(x, torch.full((4,), 1e-6))
    assert torch.allclose(out, x, atol=1e-5)
    assert not torch.allclose(f(x, torch.full((4,), 1.0)), x, atol=1e-3)
