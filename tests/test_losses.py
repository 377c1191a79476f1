import pytest
import torch
from torch import nn

from tcmlab.losses import ect_loss, edm_loss, pseudo_huber, tcm_loss, tcm_targets
from tcmlab.nets import MLP, dropout_rows, get_rng_state, set_rng_state
from tcmlab.precond import Precond
from tcmlab.schedules import ect_r


def oracle(x0):
    """The exact consistency function of a one-point data set {x0}: f(x + tε, t) = x0 for every input."""
    return lambda y, t: x0.expand_as(y).clone()


def batch(B=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, 8, 8, generator=g), torch.randn(B, 1, 8, 8, generator=g)


def test_pseudo_huber_per_sample_l2():
    a, b = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    assert torch.allclose(pseudo_huber(a, b, 0.0), torch.full((2,), 12**0.5))
    c = 0.06
    assert torch.allclose(pseudo_huber(a, b, c), torch.full((2,), (12 + c * c) ** 0.5 - c))
    assert torch.all(pseudo_huber(a, a, 1e-8) == 0)


def test_losses_are_zero_for_an_oracle():
    _, eps = batch()
    x0 = torch.randn(1, 1, 8, 8)
    x = x0.expand(16, -1, -1, -1)
    t = torch.linspace(1.0, 80.0, 16)
    assert float(ect_loss(oracle(x0), x, eps, torch.linspace(0.002, 80, 16), 0.999, 1e-8, "inv_dt").loss) == 0
    assert float(edm_loss(oracle(x0), x, eps, t).loss) == 0
    is_b = torch.arange(16) < 4
    out = tcm_loss(oracle(x0), oracle(x0), x, eps, t, is_b, 1.0, 0.999, 1e-8, "inv_dt", 0.1)
    assert float(out.loss) == 0 and torch.isfinite(out.per_sample).all()


class Marker(nn.Module):
    """f(x, t) = value + 0·x (+ a parameter so gradients can be checked)."""

    def __init__(self, value, trainable):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(float(value)), requires_grad=trainable)

    def forward(self, x, t):
        return torch.zeros_like(x) + self.w


@pytest.mark.parametrize("passes", ["routed", "full"])
def test_tcm_routing_rows_below_t_prime_take_theta0(passes):
    x, eps = batch()
    t = torch.tensor([1.0] * 4 + [1.0001, 1.002, 1.5, 3.0, 10.0, 80.0] + [2.0] * 6)
    r = ect_r(t, 0.999)
    student, theta0 = Marker(2.0, True), Marker(1.0, False)
    target, n0 = tcm_targets(student, theta0, x, r, 1.0, get_rng_state("cpu"), passes)
    below = r < 1.0
    assert below[:4].all() and n0 == int(below.sum()) and 4 < n0 < 16  # boundary rows and t < t'+Δt rows
    assert torch.all(target[below] == 1.0) and torch.all(target[~below] == 2.0)
    out = tcm_loss(student, theta0, x, eps, t, torch.arange(16) < 4, 1.0, 0.999, 1e-8, "inv_dt", 0.1,
                   teacher_passes=passes)
    out.loss.backward()
    assert theta0.w.grad is None  # θ0 is frozen: no gradient reaches it
    assert student.w.grad is not None and student.w.grad != 0


def test_routed_teacher_passes_keep_channels_last():
    # index_select alone returns NCHW rows: the teachers of a channels_last net would run in another layout
    from tcmlab.nets.dropout import take_rows
    y = torch.randn(6, 3, 4, 4).to(memory_format=torch.channels_last)
    rows = torch.tensor([4, 0, 2])
    assert torch.equal(take_rows(y, rows), y[rows]) and take_rows(y, rows).is_contiguous(
        memory_format=torch.channels_last)
    assert take_rows(y.contiguous(), rows).is_contiguous()
    seen = []

    class Spy(Marker):
        def forward(self, x, t):
            seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
            return super().forward(x, t)

    r = torch.tensor([0.5, 2.0, 0.7, 3.0, 0.1, 5.0])
    target, n0 = tcm_targets(Spy(2.0, False), Spy(1.0, False), y, r, 1.0, get_rng_state("cpu"), "routed")
    assert n0 == 3 and seen == [True, True]
    assert torch.equal(target[:, 0, 0, 0], torch.where(r < 1.0, 1.0, 2.0))


def test_tcm_boundary_weight_and_means():
    x, eps = batch()
    t = torch.tensor([1.0] * 4 + [5.0] * 12)
    is_b = torch.arange(16) < 4
    f, f0 = Marker(0.0, True), Marker(1.0, False)
    out = tcm_loss(f, f0, x, eps, t, is_b, 1.0, 0.999, 1e-8, "inv_dt", w_b=0.5)
    per = out.per_sample
    assert out.loss.item() == pytest.approx(0.5 * float(per[:4].mean()) + float(per[4:].mean()), rel=1e-6)
    out2 = tcm_loss(f, f0, x, eps, t, is_b, 1.0, 0.999, 1e-8, "inv_dt", w_b=0.5, n_boundary_total=8,
                    n_consistency_total=24)  # global normalisers for data-parallel ranks
    assert out2.loss.item() == pytest.approx(0.5 * float(per[:4].sum()) / 8 + float(per[4:].sum()) / 24, rel=1e-6)


def dropout_net(seed=0):
    torch.manual_seed(seed)
    return Precond(MLP((1, 8, 8), hidden=64, depth=2, dropout=0.5)).train()


def test_shared_dropout_mask_replays_on_cpu_and_for_row_subsets():
    f = dropout_net()
    x, _ = batch()
    t = torch.full((16,), 2.0)
    state = get_rng_state(x.device)
    out1 = f(x, t)
    set_rng_state(x.device, state)
    out2 = f(x, t)
    assert torch.equal(out1, out2)
    out3 = f(x, t)  # a fresh mask differs, so the equalities above are not vacuous
    assert not torch.allclose(out1, out3)
    rows = torch.tensor([1, 5, 6, 12])
    set_rng_state(x.device, state)
    with dropout_rows(rows, 16):
        sub = f(x[rows], t[rows])
    assert torch.allclose(sub, out1[rows], atol=1e-6)


def test_ect_loss_uses_the_student_mask_for_the_target():
    f = dropout_net()
    x, eps = batch()
    t = torch.full((16,), 0.5)
    state = get_rng_state("cpu")
    out = ect_loss(f, x, eps, t, 0.999, 1e-8, "inv_dt")
    r = ect_r(t, 0.999)
    set_rng_state("cpu", state)
    with torch.no_grad():
        D_yt = f(x + t[:, None, None, None] * eps, t)
        set_rng_state("cpu", state)
        D_yr = f(x + r[:, None, None, None] * eps, r)
        fresh = f(x + r[:, None, None, None] * eps, r)
    expected = pseudo_huber(D_yt, D_yr, 1e-8) / (t - r)
    assert torch.allclose(out.per_sample, expected, rtol=1e-5)
    assert not torch.allclose(out.per_sample, pseudo_huber(D_yt, fresh, 1e-8) / (t - r), rtol=1e-3)


@pytest.mark.parametrize("teacher_dropout", [True, False])
def test_routed_and_full_agree_whichever_teacher_draws_the_shared_masks(teacher_dropout):
    # θ0 in train mode draws the full-batch masks and θ⁻ reuses them; in eval mode θ0 draws nothing and θ⁻ draws.
    f, f0 = dropout_net(0), dropout_net(1).requires_grad_(False).train(teacher_dropout)
    x, eps = batch()
    t = torch.tensor([1.0] * 4 + [1.001] * 4 + [3.0] * 8)
    is_b = torch.arange(16) < 4
    outs = []
    for passes in ("routed", "full"):
        torch.manual_seed(7)
        outs.append(tcm_loss(f, f0, x, eps, t, is_b, 1.0, 0.999, 1e-8, "inv_dt", 0.1, teacher_passes=passes))
        outs.append(torch.get_rng_state())
    assert torch.allclose(outs[0].per_sample, outs[2].per_sample, rtol=1e-5, atol=1e-6)
    assert torch.equal(outs[1], outs[3])  # both leave the RNG where the student pass left it


def test_shared_masks_reuse_the_first_draw_and_check_the_architecture():
    from tcmlab.nets.dropout import SharedMasks
    f = dropout_net()
    x, _ = batch()
    t = torch.full((16,), 2.0)
    state = get_rng_state("cpu")
    full = f(x, t)  # the student's masks
    rows0, rows1 = torch.tensor([0, 3, 9]), torch.tensor([1, 2, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15])
    masks = SharedMasks()
    set_rng_state("cpu", state)
    with dropout_rows(rows0, 16, masks):
        out0 = f(x[rows0], t[rows0])
    assert len(masks.masks) == 2  # one full-batch mask per RowDropout call (2 blocks)
    torch.manual_seed(999)  # a different RNG state: the second block must not draw
    with dropout_rows(rows1, 16, masks):
        out1 = f(x[rows1], t[rows1])
    assert torch.allclose(out0, full[rows0], atol=1e-6) and torch.allclose(out1, full[rows1], atol=1e-6)
    other = Precond(MLP((1, 8, 8), hidden=32, depth=2, dropout=0.5)).train()  # another width: other mask shapes
    with pytest.raises(RuntimeError, match="shared dropout masks"), dropout_rows(rows1, 16, masks):
        other(x[rows1], t[rows1])


def test_teacher_routing_partition():
    from tcmlab.losses import teacher_routing
    r = torch.tensor([0.5, 1.0, 0.999, 3.0, 0.2, 1.001])
    use_f0, rows0, rows1, n0 = teacher_routing(r, 1.0)
    assert isinstance(n0, int) and n0 == 3
    assert rows0.tolist() == [0, 2, 4] and rows1.tolist() == [1, 3, 5]
    assert use_f0.tolist() == [True, False, True, False, True, False]


@pytest.mark.parametrize("stage", [1, 2])
def test_target_passes_take_the_student_masks_without_drawing(stage, monkeypatch):
    # The student draws each full-batch mask once; the target pass(es) take them (docs/decisions.md §9), so a step
    # draws as many masks as the student pass has RowDropout calls, in stage 1 and in routed stage 2 alike.
    import tcmlab.nets.dropout as dropout
    f, f0 = dropout_net(0), dropout_net(1).requires_grad_(False).train()
    x, eps = batch()
    draws = []
    real_rand = torch.rand
    monkeypatch.setattr(dropout.torch, "rand", lambda *a, **k: draws.append(a) or real_rand(*a, **k))
    if stage == 1:
        ect_loss(f, x, eps, torch.full((16,), 0.5), 0.999, 1e-8, "inv_dt")
    else:
        t = torch.tensor([1.0] * 4 + [1.001] * 4 + [3.0] * 8)
        tcm_loss(f, f0, x, eps, t, torch.arange(16) < 4, 1.0, 0.999, 1e-8, "inv_dt", 0.1)
    assert len(draws) == 2  # the 2 RowDropout calls of the student pass
