"""Few-step consistency sampling (TCM App. E; ECT/TCM `generator_fn`), in the k-diffusion calling convention, and
EDM's deterministic Heun sampler for a stage-0 diffusion model (the teacher's own sample quality).

`sample(f, x_T, ts, *, callback=None, generator=None, t_prime=None)`: x = f(x_T, ts[0]); then for each further t:
x = f(x + t·ε, t). The time grid is float64 and the state between steps is kept in float64 (EDM). The re-noising adds
t_mid·ε to the previous output, exactly as the official code does (no √(t² − t_min²) correction), docs/decisions.md §14.
`heun(D, x_T, ts, ...)` (same signature): EDM Algorithm 1 with S_churn = 0 on the grid ts, then to t = 0; D is a
denoiser (a stage-0 model: f of stage 0 is D of EDM), `edm_times(N)` is EDM's grid, Eq. (5).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .model import device_of
from .precond import T_MAX


def check_times(ts: Sequence[float], t_prime: float | None = None) -> torch.Tensor:
    """Validate a sampling grid: positive, strictly decreasing, and ≥ t′ for a stage-2 (truncated) model."""
    ts = torch.as_tensor(list(ts), dtype=torch.float64)
    if ts.numel() == 0 or not bool((ts > 0).all()):
        raise ValueError(f"sampling times must be a non-empty list of positive numbers, got {ts.tolist()}")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"sampling times must be strictly decreasing (T first), got {ts.tolist()}")
    if t_prime is not None and float(ts.min()) < t_prime:
        raise ValueError(
            f"t={float(ts.min()):g} is below this stage-2 model's dividing time t'={t_prime:g}: a truncated model is "
            f"only trained on [t', T]. Use t_mid >= t' (the paper uses t_mid = 1.0 on CIFAR-10 with t' = 1).")
    return ts


@torch.no_grad()
def sample(f, x_T: torch.Tensor, ts: Sequence[float], *, callback: Callable[[dict], None] | None = None,
           generator: torch.Generator | None = None, t_prime: float | None = None) -> torch.Tensor:
    """Multistep consistency sampling from x_T ~ N(0, ts[0]² I). `callback` gets {'i', 't', 'x', 'denoised'}."""
    ts = check_times(ts, t_prime)
    x = x_T.to(torch.float64)
    denoised = x
    for i, t in enumerate(ts.tolist()):
        if i > 0:
            eps = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device)
            x = denoised + t * eps
        denoised = f(x.to(torch.float32), torch.full((x.shape[0],), t, device=x.device)).to(torch.float64)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": denoised})
    return denoised.to(torch.float32)


def edm_times(num_steps: int = 18, t_min: float = 0.002, t_max: float = T_MAX, rho: float = 7.0) -> torch.Tensor:
    """EDM Eq. (5): t_i = (t_max^(1/ρ) + i/(N−1)·(t_min^(1/ρ) − t_max^(1/ρ)))^ρ, i = 0..N−1 (float64, decreasing).
    EDM's defaults: N = 18 (35 network calls with Heun, CIFAR-10), t_min = 0.002, t_max = 80, ρ = 7."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"EDM's time grid needs an integer num_steps >= 2, got {num_steps!r}")
    if not 0 < t_min < t_max:
        raise ValueError(f"EDM's time grid needs 0 < t_min < t_max, got t_min={t_min}, t_max={t_max}")
    if not rho > 0:
        raise ValueError(f"EDM's time grid needs rho > 0 (EDM: 7), got {rho}")
    i = torch.arange(num_steps, dtype=torch.float64)
    return (t_max ** (1 / rho) + i / (num_steps - 1) * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho


@torch.no_grad()
def heun(D, x_T: torch.Tensor, ts: Sequence[float], *, callback: Callable[[dict], None] | None = None,
         generator: torch.Generator | None = None, t_prime: float | None = None) -> torch.Tensor:
    """EDM Algorithm 1 (deterministic, S_churn = 0): the probability-flow ODE dx/dt = (x − D(x, t))/t from ts[0] to
    t = 0, Heun steps between the grid's times and an Euler step into t = 0 (2N − 1 calls of D for N times; ts are
    positive, t = 0 is appended here). `callback` gets {'i', 't', 'x', 'denoised'} once per grid time: x_i and
    D(x_i, t_i). `generator` is unused (no noise after x_T) and kept for the uniform signature; a truncated model
    (t_prime) is not a denoiser and is refused."""
    if t_prime is not None:
        raise ValueError("heun integrates a diffusion model's ODE down to t = 0; a stage-2 (truncated) model is "
                         "not a denoiser below t'. Sample it with `sample`.")
    ts = torch.cat([check_times(ts), torch.zeros(1, dtype=torch.float64)]).tolist()
    x = x_T.to(torch.float64)

    def slope(x, t):
        denoised = D(x.to(torch.float32), torch.full((x.shape[0],), t, device=x.device)).to(torch.float64)
        return (x - denoised) / t, denoised

    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        d, denoised = slope(x, t)
        x_next = x + (t_next - t) * d
        if t_next > 0:
            d_next, _ = slope(x_next, t_next)
            x_next = x + (t_next - t) * (d + d_next) / 2
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": denoised})
        x = x_next
    return x.to(torch.float32)


def generate(f, n: int, shape: Sequence[int], ts: Sequence[float] = (T_MAX,), *, device=None,
             generator: torch.Generator | None = None, t_prime: float | None = None,
             callback: Callable[[dict], None] | None = None, batch: int = 1024, sampler=sample) -> torch.Tensor:
    """Draw n samples: x_T = ts[0]·z, then `sampler` (`sample`, or `heun` for a diffusion model). With `sample`,
    ts=(T,) is one step and ts=(T, t_mid) two steps (App. E).

    Noise is drawn on the CPU from `generator` (the same samples on any device): first the n z's, then the sampler's
    noise (ε of each further step), so that a 1-step and a 2-step call with the same seed start every sample from the
    same z, whatever `batch` is (drawn batch by batch, the z of a later batch would follow the earlier batches' ε).
    The network runs on `device`, by default the device its weights live on. Returns CPU tensors."""
    ts = check_times(ts, t_prime).tolist()
    device = device_of(f) if device is None else torch.device(device)
    sizes = [min(batch, n - start) for start in range(0, n, batch)]
    steps_gen = generator
    if generator is not None and len(ts) > 1 and len(sizes) > 1:  # ε from where the z's end, without holding them
        steps_gen = torch.Generator().set_state(generator.get_state())
        for m in sizes:
            torch.randn((m, *shape), generator=steps_gen, dtype=torch.float64)
    out = []
    for m in sizes:
        z = torch.randn((m, *shape), generator=generator, dtype=torch.float64)
        out.append(sampler(f, (ts[0] * z).to(device), ts, callback=callback, generator=steps_gen, t_prime=t_prime))
    if steps_gen is not generator:
        generator.set_state(steps_gen.get_state())  # the generator ends where one batch would leave it
    return torch.cat(out).cpu()


def check_t_mid(t_mid: float, t_max: float) -> None:
    """The 2-step sampler goes T -> t_mid (TCM App. E): t_mid must lie in (0, T)."""
    if not 0 < t_mid < t_max:
        raise ValueError(f"t_mid={t_mid:g} (--t-mid) must be in (0, T={t_max:g}) of this model: the 2-step sampler "
                         f"goes T -> t_mid")


def one_and_two_step(model, n: int, t_mid: float, seed: int = 0, device=None, batch: int = 1024
                     ) -> dict[tuple[float, ...], torch.Tensor]:
    """{ts: samples} of a `TrainedModel` for 1 step (T) and 2 steps (T → t_mid), each from noise seeded `seed` (the
    same noise for both, and for any model of the same shape)."""
    check_t_mid(t_mid, model.t_max)
    out = {}
    for ts in ((model.t_max,), (model.t_max, t_mid)):
        g = torch.Generator().manual_seed(seed)
        out[ts] = generate(model.f, n, model.shape, ts, device=device, generator=g, t_prime=model.t_prime, batch=batch)
    return out
