"""Shared dropout: the same mask in the student pass and in the teacher (target) passes.

ECT/TCM draw the target with the dropout mask of the student pass ("shared dropout mask", ECT loss). The official
code saves and restores the CUDA RNG state, which only works on CUDA. Here the state of the generator of the device
that runs the network is saved and restored (`get_rng_state`/`set_rng_state`), so it works on CPU and GPU alike.

TCM stage 2 runs the teachers on row subsets (θ0 on rows with r < t′, θ⁻ on the rest). A mask drawn for a subset
would differ from the student's mask for those rows, so inside `dropout_rows(rows, batch)` every `RowDropout` draws
the mask for the whole batch and keeps `rows`: each row sees exactly the mask it saw in the student pass.

The teacher passes replay the student's RNG state, so they would draw the student's full-batch masks again. Passing
one `SharedMasks()` to the student's block (`dropout_rows(None, batch, masks)`: full batch, nothing selected) and to
the teachers' blocks draws them once: the first block that draws keeps each full-batch mask, later blocks take them in
call order (the masks are the ones a redraw would give; only the drawing is saved: ~8 % of a stage-1 step of the
digits MLP on the CPU, where torch's generator is slow; docs/performance.md).

`replay_rng(device, state)` runs a teacher pass from the student's RNG state and then puts the generator back where
the student pass left it, so the next micro-batch or step draws fresh masks whatever the teacher passes drew (or did
not draw: a teacher in eval mode draws nothing). docs/decisions.md §9.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn


class SharedMasks:
    """Full-batch dropout masks carried from one `dropout_rows` block to the next, in `RowDropout` call order. A mask
    is kept as the scale x is multiplied by (keep / (1 − p)): the student pass's autograd saves that same tensor for
    its backward, so keeping it here costs no memory."""

    def __init__(self):
        self.masks: list[tuple[float, torch.Tensor]] = []


@dataclass
class _Rows:
    rows: torch.Tensor | None  # [n] long: the batch rows this pass runs on; None: all `batch` rows
    batch: int  # full batch size the masks are drawn for
    shared: SharedMasks | None
    calls: int = 0  # RowDropout calls so far in this block

    def full_mask(self, shape: tuple[int, ...], p: float, x: torch.Tensor) -> torch.Tensor:
        """The mask scale of call number `calls` for the full batch: drawn (`dropout_scale`), or taken from
        `shared`, in x's dtype."""
        k, self.calls = self.calls, self.calls + 1
        if self.shared is not None and k < len(self.shared.masks):
            p_k, scale = self.shared.masks[k]
            if p_k != p or tuple(scale.shape) != shape:
                raise RuntimeError(f"shared dropout masks: call {k} has p={p}, shape {shape}; the mask drawn for it "
                                   f"has p={p_k}, shape {tuple(scale.shape)} (teacher nets must share one "
                                   "architecture)")
            return scale.to(x.dtype)
        scale = dropout_scale(shape, p, x)
        if self.shared is not None:
            self.shared.masks.append((p, scale))
        return scale


def take_rows(v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """v[rows] along dim 0 (`index_select`) in v's memory format, for tensors without gradient (the teachers' inputs):
    index_select alone returns a contiguous tensor, so the routed teacher passes of a channels_last network would run
    in NCHW (and recompile under torch.compile). Dropout masks are drawn contiguous, as in a plain run."""
    if v.dim() == 4 and v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous():
        out = torch.empty((rows.numel(), *v.shape[1:]), dtype=v.dtype, device=v.device,
                          memory_format=torch.channels_last)
        return torch.index_select(v, 0, rows, out=out)
    return v.index_select(0, rows)


def dropout_scale(shape: tuple[int, ...], p: float, x: torch.Tensor) -> torch.Tensor:
    """Inverted dropout's factor: keep / (1 − p) with keep = (rand ≥ p), in x's dtype on x's device."""
    return (torch.rand(shape, device=x.device) >= p).to(x.dtype) * (1 / (1 - p))


_ROWS: ContextVar[_Rows | None] = ContextVar("tcmlab_dropout_rows", default=None)


@contextmanager
def dropout_rows(rows: torch.Tensor | None, batch: int, shared: SharedMasks | None = None):
    """Within this block, `RowDropout` draws masks for `batch` rows and applies the masks of `rows` (a long index
    tensor; None: every row, in order) only; with `shared`, masks drawn by an earlier block with the same `shared` are
    reused, not redrawn."""
    token = _ROWS.set(_Rows(rows, batch, shared))
    try:
        yield
    finally:
        _ROWS.reset(token)


class RowDropout(nn.Module):
    """Inverted dropout whose mask depends only on the RNG state and the full-batch shape (see module doc)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        sel = _ROWS.get()
        if sel is None:
            return x * dropout_scale(tuple(x.shape), self.p, x)
        scale = sel.full_mask((sel.batch,) + tuple(x.shape[1:]), self.p, x)
        return x * (scale if sel.rows is None else scale.index_select(0, sel.rows))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def get_rng_state(device: torch.device | str):
    """RNG state of the generator that dropout on `device` draws from (CPU or CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def set_rng_state(device: torch.device | str, state) -> None:
    """Restore a state from `get_rng_state` (always a CPU byte tensor, as torch requires)."""
    device = torch.device(device)
    state = state.cpu()
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


@contextmanager
def replay_rng(device: torch.device | str, state):
    """Run the block from RNG `state` (the student's), then restore the state current on entry."""
    after = get_rng_state(device)
    set_rng_state(device, state)
    try:
        yield
    finally:
        set_rng_state(device, after)
