"""Run health: gradient-norm spikes, watched at every step and reported, never acted on (docs/decisions.md §20).

Consistency training can meet sudden gradient-norm spikes (users of continuous-time consistency models report them:
NVlabs/rcm issue #10, "GradNorm Spike in continuous-time sCM training"), and a metrics row every `log_every` steps
shows only the step it was written at. `grad_spike` tells whether a step's gradient norm is a spike against the steps
before it; train() logs each spike as a `grad_spike` row, every `train` row carries the largest norm since the
previous row (`grad_norm_max`), and the checkpoint carries both, so a resumed run watches as an uninterrupted one.
The thresholds are tcmlab's choice (neither paper nor official code watches for spikes).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

SPIKE_FACTOR = 10.0  # a spike: more than this many times the median of the recent steps
SPIKE_WINDOW = 100  # the recent steps: at most this many, the oldest dropped first
SPIKE_WARMUP = 20  # fewer recent steps than this (a run's or a resumed call's first steps): no verdict


def grad_spike(recent: Sequence[float], grad_norm: float, factor: float = SPIKE_FACTOR,
               warmup: int = SPIKE_WARMUP) -> float | None:
    """The median of `recent` (finite gradient norms of the steps before this one) if `grad_norm` exceeds `factor`
    times it, else None; None too with fewer than `warmup` recent steps, a median of 0 (no gradient to compare
    with), or a non-finite norm (that step is a `nonfinite` stop or an fp16 skip, reported as such)."""
    if len(recent) < warmup or not math.isfinite(grad_norm):
        return None
    median = statistics.median(recent)
    return median if median > 0 and grad_norm > factor * median else None
