"""Few-step consistency sampling (TCM App. E; ECT/TCM `generator_fn`), in the k-diffusion calling convention.

`sample(f, x_T, ts, *, callback=None, generator=None, t_prime=None)`: x = f(x_T, ts[0]); then for each further t:
x = f(x + t·ε, t). The time grid is float64 and the state between steps is kept in float64 (EDM). The re-noising adds
t_mid·ε to the previous output, exactly as the official code does (no √(t² − t_min²) correction), docs/decisions.md §14.
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


def generate(f, n: int, shape: Sequence[int], ts: Sequence[float] = (T_MAX,), *, device=None,
             generator: torch.Generator | None = None, t_prime: float | None = None,
             callback: Callable[[dict], None] | None = None, batch: int = 1024) -> torch.Tensor:
    """Draw n samples: x_T = ts[0]·z, then `sample`. ts=(T,) is one step, ts=(T, t_mid) two steps (App. E).

    Noise is drawn on the CPU from `generator` (the same samples on any device); the network runs on `device`,
    by default the device its weights live on. Returns CPU tensors."""
    ts = check_times(ts, t_prime).tolist()
    device = device_of(f) if device is None else torch.device(device)
    out = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        z = torch.randn((m, *shape), generator=generator, dtype=torch.float64)
        out.append(sample(f, (ts[0] * z).to(device), ts, callback=callback, generator=generator, t_prime=t_prime))
    return torch.cat(out).cpu()


def one_and_two_step(model, n: int, t_mid: float, seed: int = 0, device=None, batch: int = 1024
                     ) -> dict[tuple[float, ...], torch.Tensor]:
    """{ts: samples} of a `TrainedModel` for 1 step (T) and 2 steps (T → t_mid), each from noise seeded `seed` (the
    same noise for both, and for any model of the same shape)."""
    out = {}
    for ts in ((model.t_max,), (model.t_max, t_mid)):
        g = torch.Generator().manual_seed(seed)
        out[ts] = generate(model.f, n, model.shape, ts, device=device, generator=g, t_prime=model.t_prime, batch=batch)
    return out
