"""torch.distributed for `train()`: join the process group that `torchrun` describes in the environment.

`torchrun --standalone --nproc_per_node=N -m tcmlab train ...` (or multi-node with `--nnodes`/`--rdzv-endpoint`)
starts N processes with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. `process_group()` forms the
group from them (nccl on CUDA, gloo on CPU), picks the device from LOCAL_RANK, and tears the group down on exit if
it formed it. A group the caller initialised itself is used as it is. Without torchrun: rank 0 of 1.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ


@contextmanager
def process_group(device: str | torch.device | None = None):
    """Yield (rank, world size, device), joining torchrun's process group first when there is one to join."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and (dist.is_initialized() or _launched_by_torchrun()):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
    formed = False
    if _launched_by_torchrun() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        formed = True
    try:
        yield (*world(), device)
    finally:
        if formed:
            dist.destroy_process_group()


def agree(rank: int, world_size: int, error: BaseException | None) -> None:
    """Make every rank raise if any rank failed a check (otherwise the others would wait for it forever)."""
    if world_size == 1:
        if error is not None:
            raise error
        return
    messages = [None] * world_size
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None]
    if failed:
        raise RuntimeError("another process of this run failed its checks: " + "; ".join(failed))


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (in place; a no-op outside a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
    return values


def all_reduce_max(value: float, device: torch.device) -> float:
    """The largest of one number over all ranks (the number itself outside a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        value = float(t.item())
    return value
