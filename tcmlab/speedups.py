"""GPU speed options of training, off by default and not in the official code: `train.channels_last` (weights and
images in the channels_last memory format, which tensor-core convolutions prefer) and `train.compile`
(`torch.compile` of the student and the teachers). Neither changes what is computed, only how (up to float
rounding: fused kernels sum in another order): the losses, the dropout masks, the checkpoints (always stored
contiguous) and resuming are those of a plain run. `python -m tcmlab.bench --compare-recipes` measures bf16 +
channels_last + compile against the official fp32 recipe (docs/performance.md).
"""

from __future__ import annotations

import contextlib

import torch

RECOMPILE_LIMIT = 64


def memory_format(channels_last: bool, ndim: int) -> torch.memory_format:
    """channels_last for 4-D image batches when asked, else the contiguous format."""
    return torch.channels_last if channels_last and ndim == 4 else torch.contiguous_format


@contextlib.contextmanager
def compile_settings(limit: int = RECOMPILE_LIMIT):
    """Inside: dynamo's per-function recompile limit raised to `limit` (torch's default: 8; never lowered) and
    inductor's `fallback_random` on; torch's settings are restored on exit.

    The limit: the student, θ⁻ and θ0 share `Precond.forward`'s code object, and a step has grad and no-grad passes,
    full-batch and routed rows (whose count changes every step), with and without the student's dropout masks; past
    the limit dynamo silently runs the rest eagerly (seen on the CPU in the benchmark: unet32, bf16, channels_last,
    all four stages in one process). fallback_random: inductor's own philox draws would give compiled dropout masks
    that no eager pass and no replay of the generator's state reproduces (the official strategy's teacher passes and
    a resumed run replay that state; docs/decisions.md §9)."""
    from torch._inductor import config as inductor_config
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    with cfg.patch(**{name: max(getattr(cfg, name), limit)}), inductor_config.patch(fallback_random=True):
        yield


def compiled(*nets):
    """`torch.compile` of each network (None stays None); call them inside `compile_settings()`."""
    return tuple(None if n is None else torch.compile(n) for n in nets)


def match_optimizer_formats(opt: torch.optim.Optimizer) -> None:
    """Give each optimiser-state tensor its parameter's memory format. `load_state_dict` restores the state of a
    checkpoint (stored contiguous) as contiguous tensors, so a resumed channels_last run would mix layouts in every
    update (same values; the multi-tensor update may fall back to per-tensor kernels)."""
    for p, state in opt.state.items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def compile_stats() -> dict:
    """dynamo's counters so far: captured calls and unique graphs, graph breaks, and how often dynamo gave up on a
    function at the recompile limit (once per function: it then runs eagerly for new inputs)."""
    from torch._dynamo.utils import counters
    return {"stats": dict(counters["stats"]), "graph_breaks": sum(counters["graph_break"].values()),
            "recompile_limit_hit": sum(v for k, v in counters["unimplemented"].items() if "recompile limit" in k)}
