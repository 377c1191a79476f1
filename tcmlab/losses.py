"""Training losses of the three stages, as pure functions of explicit inputs (x, ε, t, ratio, ...).

- `edm_loss`: stage 0, EDM denoising loss (Karras et al. 2022, Eq. 2 with λ(σ) = (σ²+σ_d²)/(σ·σ_d)²).
- `ect_loss`: stage 1, consistency training, TCM Eq. (4) with ECT's shared ε and shared dropout mask.
- `tcm_loss`: stage 2, TCM Eq. (10)/(11): w_b·mean(boundary) + mean(consistency), targets from θ0 where r < t′.

Each returns a `LossOut` with the scalar to back-propagate and per-sample values with their t (for loss-by-t plots).
`n_total`-style arguments let a data-parallel rank normalise by the global count, so that DDP's gradient average
equals the single-process gradient of the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .nets.dropout import SharedMasks, dropout_rows, get_rng_state, replay_rng, take_rows
from .precond import SIGMA_DATA, append_dims, edm_scalings
from .schedules import ect_r


@dataclass
class LossOut:
    loss: torch.Tensor  # scalar to back-propagate
    per_sample: torch.Tensor  # [B] weighted per-sample losses (detached)
    t: torch.Tensor  # [B] noise level of the student input
    r: torch.Tensor | None = None  # [B] noise level of the target input (stages 1, 2)
    is_boundary: torch.Tensor | None = None  # [B] bool, stage 2 only
    teacher_rows: int = 0  # number of rows whose target came from θ0 (stage 2)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """TCM App. E: d(a, b) = √(‖a − b‖₂² + c²) − c per sample, the L2 norm over all non-batch dims (c unscaled)."""
    sq = (a - b).float().pow(2).flatten(1).sum(1)
    return (sq + c * c).sqrt() - c


def consistency_weight(t: torch.Tensor, r: torch.Tensor, weighting: str, sigma_data: float = SIGMA_DATA):
    """ω(t)/Δt of TCM Eq. (4): 'inv_dt' = 1/Δt (ω = 1, CIFAR-10); 'cout_sq' = 1/c_out(t)² (ω = Δt/c_out², ImageNet)."""
    if weighting == "inv_dt":
        return 1.0 / (t - r)
    if weighting == "cout_sq":
        return 1.0 / edm_scalings(t, sigma_data)[1] ** 2
    raise ValueError(f"weighting must be 'inv_dt' or 'cout_sq', got {weighting!r}")


def _mean(values: torch.Tensor, n_total: int | None) -> torch.Tensor:
    n = values.numel() if n_total is None else n_total
    return values.sum() / max(n, 1)


def edm_loss(f, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, sigma_data: float = SIGMA_DATA,
             n_total: int | None = None) -> LossOut:
    """Stage 0 (EDM): λ(t)·‖f(x + tε, t) − x‖² with λ(t) = (t² + σ_d²)/(t·σ_d)², summed over pixels as in EDM."""
    D = f(x + append_dims(t, x.ndim) * eps, t)
    weight = (t**2 + sigma_data**2) / (t * sigma_data) ** 2
    per = weight * (D - x).float().pow(2).flatten(1).sum(1)
    return LossOut(_mean(per, n_total), per.detach(), t)


def ect_loss(f, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, ratio: float, c: float, weighting: str,
             n_total: int | None = None, f_minus=None) -> LossOut:
    """Stage 1 (ECT), TCM Eq. (4): ω(t)/Δt · d(f_θ(x + tε, t), f_θ⁻(x + rε, r)), r = t − Δt.

    One ε for both inputs; θ⁻ = stopgrad(θ) (the online weights); the target pass replays the RNG state of the
    student pass and takes the student's dropout masks (`SharedMasks`, not redrawn), so both see the same mask on
    whatever device runs them (docs/decisions.md §9).
    `f_minus` is the same network unwrapped (e.g. the module inside DDP); it defaults to `f`.
    """
    f_minus = f if f_minus is None else f_minus
    r = ect_r(t, ratio)
    state, masks = get_rng_state(x.device), SharedMasks()
    with dropout_rows(None, x.shape[0], masks):
        D_yt = f(x + append_dims(t, x.ndim) * eps, t)
    with torch.no_grad(), replay_rng(x.device, state), dropout_rows(None, x.shape[0], masks):
        D_yr = f_minus(x + append_dims(r, x.ndim) * eps, r)
    per = pseudo_huber(D_yt, D_yr, c) * consistency_weight(t, r, weighting)
    return LossOut(_mean(per, n_total), per.detach(), t, r)


def teacher_routing(r: torch.Tensor, t_prime: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The row partition of TCM Eq. (5)/(6): (use_f0 [B] bool, rows of θ0, rows of θ⁻, n0) with use_f0 = r < t′.

    n0 is read to the host once (the only synchronisation of a stage-2 step on CUDA); the index tensors then come
    from `torch.nonzero_static` with host-known sizes, so no further read waits for the device.
    """
    use_f0 = r < t_prime
    n0 = int(use_f0.sum())
    rows0 = torch.nonzero_static(use_f0, size=n0).flatten()
    rows1 = torch.nonzero_static(~use_f0, size=use_f0.numel() - n0).flatten()
    return use_f0, rows0, rows1, n0


def tcm_targets(f, f0, y_r: torch.Tensor, r: torch.Tensor, t_prime: float, rng_state, teacher_passes: str,
                routing=None, masks: SharedMasks | None = None):
    """Targets of TCM Eq. (5)/(6): f_θ0(y_r, r) where r < t′, else f_θ⁻(y_r, r); no gradient flows.

    teacher_passes='routed' (ours): θ0 runs only on its rows and θ⁻ only on the rest, so the teacher work is B rows;
    both passes take the full-batch dropout masks from `masks` (the student's, as in stage 1's target pass; without
    it they share one draw). teacher_passes='full' (official TCM code): each network runs on the whole batch and
    `torch.where` keeps its rows. Both replay the student's RNG state, so every row gets the student's dropout
    mask: routed passes through `dropout_rows` (the mask rows of their batch rows), full passes by redrawing the
    same full-batch masks from the replayed state. The two strategies return the same targets; afterwards the RNG
    is where the student pass left it (docs/decisions.md §7, §9). A network with no rows is not run. `routing`:
    `teacher_routing(r, t_prime)` if the caller has it already.
    """
    if teacher_passes not in ("routed", "full"):
        raise ValueError(f"teacher_passes must be 'routed' or 'full', got {teacher_passes!r}")
    B = y_r.shape[0]
    use_f0, rows0, rows1, n0 = teacher_routing(r, t_prime) if routing is None else routing
    with torch.no_grad():
        if teacher_passes == "routed":
            target = torch.empty_like(y_r, dtype=torch.float32)
            masks = SharedMasks() if masks is None else masks
            for net, rows in ((f0, rows0), (f, rows1)):
                if rows.numel() == 0:
                    continue
                with replay_rng(y_r.device, rng_state), dropout_rows(rows, B, masks):
                    out = net(take_rows(y_r, rows), r.index_select(0, rows))
                target.index_copy_(0, rows, out.to(torch.float32))
            return target, n0
        outs = []
        for net, rows in ((f0, rows0), (f, rows1)):
            if rows.numel() == 0:
                outs.append(None)
                continue
            with replay_rng(y_r.device, rng_state):
                outs.append(net(y_r, r).to(torch.float32))
        out0, out1 = outs
        if out0 is None or out1 is None:
            return out1 if out0 is None else out0, n0
        return torch.where(append_dims(use_f0, y_r.ndim), out0, out1), n0


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, n_total: int | None) -> torch.Tensor:
    """Σ values[mask] / n_total (default: the number of rows in `mask`), without a data-dependent shape."""
    n = mask.sum().clamp(min=1) if n_total is None else max(n_total, 1)
    return torch.where(mask, values, 0.0).sum() / n


def tcm_loss(f, f0, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, is_boundary: torch.Tensor, t_prime: float,
             ratio: float, c: float, weighting: str, w_b: float, teacher_passes: str = "routed",
             n_boundary_total: int | None = None, n_consistency_total: int | None = None, f_minus=None) -> LossOut:
    """Stage 2 (TCM), Eq. (10)/(11): w_b·(1/N_B)·Σ L_B + (1/(B − N_B))·Σ L_C.

    All t ≥ t′, so the student f_θ runs on every row (with gradient). Boundary rows (t = t′) and consistency rows
    with r < t′ take their target from the frozen θ0 (`f0`, requires_grad False), the rest from stopgrad(θ).
    Boundary and consistency rows share d and the weighting (official code). `f_minus` as in `ect_loss`.
    The routing is read before the student pass, so on CUDA its one synchronisation finds the queue nearly empty.
    """
    r = ect_r(t, ratio)
    routing = teacher_routing(r, t_prime)
    state, masks = get_rng_state(x.device), SharedMasks()
    with dropout_rows(None, x.shape[0], masks):
        D_yt = f(x + append_dims(t, x.ndim) * eps, t)
    f_minus = f if f_minus is None else f_minus
    D_yr, n_teacher = tcm_targets(f_minus, f0, x + append_dims(r, x.ndim) * eps, r, t_prime, state, teacher_passes,
                                  routing, masks)
    per = pseudo_huber(D_yt, D_yr, c) * consistency_weight(t, r, weighting)
    loss = (w_b * _masked_mean(per, is_boundary, n_boundary_total)
            + _masked_mean(per, ~is_boundary, n_consistency_total))
    return LossOut(loss, per.detach(), t, r, is_boundary, n_teacher)
