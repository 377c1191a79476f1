"""GPU speed options of training, off by default and not in the official code: `train.channels_last` (weights and
images in the channels_last memory format, which tensor-core convolutions prefer) and `train.compile`
(`torch.compile` of the student and the teachers). Neither changes what is computed, only how (up to float
rounding: fused kernels sum in another order): the losses, the dropout masks, the checkpoints (always stored
contiguous) and resuming are those of a plain run. `python -m tcmlab.bench --compare-recipes` measures bf16 +
channels_last + compile against the official fp32 recipe (docs/performance.md).
"""

from __future__ import annotations

import torch

RECOMPILE_LIMIT = 64


def memory_format(channels_last: bool, ndim: int) -> torch.memory_format:
    """channels_last for 4-D image batches when asked, else the contiguous format."""
    return torch.channels_last if channels_last and ndim == 4 else torch.contiguous_format


def allow_recompiles(limit: int = RECOMPILE_LIMIT) -> None:
    """Raise dynamo's per-function recompile limit (torch's default: 8), never lower it. The student, θ⁻ and θ0 share
    `Precond.forward`'s code object, and a step has grad and no-grad passes, full-batch and routed rows (whose count
    changes every step), with and without the student's dropout masks; past the limit dynamo would silently run the
    rest eagerly (seen on the CPU in the benchmark: unet32, bf16, channels_last, all four stages in one process)."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), limit))


def compiled(*nets):
    """`torch.compile` of each network (None stays None), after raising the recompile limit and asking inductor for
    torch's own random numbers (`fallback_random`): its default philox draws would give compiled dropout masks that
    no eager pass and no replay of the generator's state reproduces (the official strategy's teacher passes, and a
    resumed run, replay that state; docs/decisions.md §9)."""
    import torch._inductor.config as inductor_config
    allow_recompiles()
    inductor_config.fallback_random = True
    return tuple(None if n is None else torch.compile(n) for n in nets)


def compile_stats() -> dict:
    """dynamo's counters so far: captured calls and unique graphs, graph breaks, and the number of functions that hit
    the recompile limit (each then runs eagerly for new inputs)."""
    from torch._dynamo.utils import counters
    return {"stats": dict(counters["stats"]), "graph_breaks": sum(counters["graph_break"].values()),
            "recompile_limit_hit": sum(v for k, v in counters["unimplemented"].items() if "recompile limit" in k)}
