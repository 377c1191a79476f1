"""The training loop of all three stages: `train(cfg, run_dir)`; call it again with the same arguments to continue.

Per step (global batch B, drawn from one seeded generator so that any number of data-parallel ranks sees the same
global batch; each rank takes its rows):
  stage 0: EDM loss; stage 1: ECT loss with ratio = ect_ratio(i); stage 2: TCM loss, θ0 = frozen stage-1 EMA.
Then gradient norm, a stop on any non-finite loss or gradient (logged to metrics.jsonl, never zeroed), the optimiser
step with lr = inverse_sqrt_lr(i), and the EMA update; i = step + train.step_offset (docs/decisions.md §11).
A checkpoint (model, EMA, optimiser, step, all RNG states, and in stage 2 θ0 with its source) is written atomically
every `ckpt_every` steps and at the end of every call.

Runs under `torchrun` (DDP) when torch.distributed is initialised: rank 0 writes, gradients are averaged.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import checkpoint
from .config import RunConfig, from_dict, to_dict, to_json
from .data import load_data
from .ema import ema_beta, update_ema
from .losses import LossOut, ect_loss, edm_loss, tcm_loss
from .model import CKPT_NAME, build_model, checkpoint_path, frozen_copy, load_state, model_state
from .schedules import LogNormal, TruncatedLogStudentT, ect_ratio, inverse_sqrt_lr, n_boundary, tcm_times


def loss_t_edges(t_max: float) -> np.ndarray:
    """Bins of the loss-by-t diagnostic: 8 log-spaced bins over [0.002, T]."""
    return np.geomspace(0.002, t_max, 9)


class NonFiniteError(FloatingPointError):
    """Training hit a non-finite loss or gradient; the last checkpoint is untouched."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    last: dict  # the last metrics row


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_config(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse a run directory that holds a different run (only train.steps may change, to extend a run)."""
    path = run_dir / "config.json"
    if not path.exists():
        return
    old = from_dict(json.loads(path.read_text()))
    new_cmp = replace(cfg, train=replace(cfg.train, steps=old.train.steps))
    if old != new_cmp:
        a, b = _flat(to_dict(old)), _flat(to_dict(new_cmp))
        diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        raise ValueError(f"{run_dir} holds a different run (differs in: {', '.join(diff)}). Use a new run directory, "
                         f"or delete this one to start over. Only train.steps may change between calls.")


def _init_state(cfg: RunConfig, shape) -> tuple[dict, dict]:
    """The previous stage's EMA weights (stage 1 from 0 or 1; stage 2 from 1) after checking compatibility, and
    where they came from ({'path', 'step', 'sha256'}), on the CPU."""
    path = checkpoint_path(cfg.init_from)
    state, src = load_state(path, "cpu")
    allowed = {1: (0, 1), 2: (1,)}[cfg.stage]
    if src.stage not in allowed:
        raise ValueError(f"init_from={cfg.init_from} is a stage-{src.stage} run; stage {cfg.stage} needs a "
                         f"stage-{' or '.join(map(str, allowed))} run")
    if src.net != cfg.net or tuple(state["shape"]) != tuple(shape):
        raise ValueError(f"init_from={cfg.init_from} has an incompatible network or data shape "
                         f"(its net={src.net}, shape={tuple(state['shape'])}; this run: net={cfg.net}, shape={shape})")
    source = {"path": str(path), "step": int(state["step"]), "sha256": checkpoint.sha256(path)}
    return model_state(state, "ema"), source


def _loss_by_t(out: LossOut, edges: np.ndarray) -> list:
    t, per = out.t.detach().cpu().numpy(), out.per_sample.cpu().numpy()
    idx = np.clip(np.digitize(t, edges) - 1, 0, len(edges) - 2)
    rows = []
    for b in range(len(edges) - 1):
        sel = per[idx == b]
        rows.append(float(sel.mean()) if sel.size else None)
    return rows


def _append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint so metrics.jsonl matches the resumed state."""
    if not path.exists():
        return
    rows = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
    checkpoint.atomic_write_text(path, "".join(r + "\n" for r in rows))


def train(cfg: RunConfig, run_dir: str | Path, *, steps: int | None = None, device: str | torch.device | None = None,
          progress: bool = True, on_log: Callable[[dict], None] | None = None,
          eval_fn: Callable[[int, torch.nn.Module], dict] | None = None, eval_every: int = 0) -> TrainResult:
    """Train one stage in `run_dir`, resuming from its checkpoint if there is one.

    steps: run at most this many more steps in this call (default: until cfg.train.steps). on_log(row) receives
    every metrics row (live plots). eval_fn(step, ema_model) -> {name: value} runs every `eval_every` steps and at
    the end; its results are logged as rows with kind='eval'.
    """
    run_dir = Path(run_dir)
    if cfg.stage == 2 and cfg.init_from is None:
        raise ValueError("stage 2 needs init_from: the stage-1 run directory (or its latest.safetensors) whose EMA "
                         "weights become θ0 and the student's initialisation")
    rank, world = _world()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tc = cfg.train
    if tc.batch % world:
        raise ValueError(f"train.batch={tc.batch} must be divisible by the number of processes ({world})")
    b_rank = tc.batch // world
    b_gpu = tc.batch_gpu or b_rank
    if b_rank % b_gpu:
        raise ValueError(f"train.batch_gpu={b_gpu} must divide the per-process batch {b_rank}")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        _check_config(run_dir, cfg)
        checkpoint.atomic_write_text(run_dir / "config.json", to_json(cfg))

    data = load_data(cfg.data).to(device)
    shape = data.shape
    torch.manual_seed(tc.seed)  # the initial weights depend on train.seed alone, not on earlier RNG use
    f = build_model(cfg, shape).to(device).train()
    f0, init_source = None, None
    ckpt_file = run_dir / CKPT_NAME
    resume = ckpt_file.exists()
    # Resume state is read on the CPU (RNG states must be CPU byte tensors); load_state_dict copies to the device.
    state = load_state(ckpt_file, "cpu")[0] if resume else None
    if cfg.init_from is not None and not resume:
        init_weights, init_source = _init_state(cfg, shape)
        f.load_state_dict(init_weights)
    elif resume:
        init_source = state.get("init_source")
    if cfg.stage == 2:
        # θ0: the stage-1 EMA weights, frozen (TCM Eq. 5), kept in this run's checkpoint so that a resumed run
        # trains against the same teacher even if the stage-1 run moved on or is gone (docs/decisions.md §10).
        # Dropout on (official code) or off (paper), docs/decisions.md §8.
        f0 = frozen_copy(f)
        if resume:
            f0.load_state_dict(state["teacher"])
        f0.train(cfg.loss.teacher_dropout)
    ema = frozen_copy(f).eval()

    opt_cls = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam}[tc.optimizer]
    opt = opt_cls(f.parameters(), lr=tc.lr, betas=tc.betas)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")
    gen = torch.Generator().manual_seed(tc.seed)  # global-batch randomness: indices, ε, t, boundary positions
    torch.manual_seed(tc.seed * 1000 + rank)  # dropout masks: per-rank seeds
    step = 0
    metrics_path = run_dir / "metrics.jsonl"

    if resume:
        f.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        gen.set_state(state["rng"]["data"])
        rng_torch, rng_cuda = state["rng"]["torch"], state["rng"]["cuda"]
        torch.set_rng_state(rng_torch[rank % len(rng_torch)])
        if device.type == "cuda" and rng_cuda:
            torch.cuda.set_rng_state(rng_cuda[rank % len(rng_cuda)], device)
        step = int(state["step"])
        if rank == 0:
            _truncate_metrics(metrics_path, step)
        del state

    f_train = f
    if world > 1:
        f_train = torch.nn.parallel.DistributedDataParallel(f, device_ids=[device] if device.type == "cuda" else None,
                                                            broadcast_buffers=False)
    end = tc.steps if steps is None else min(tc.steps, step + steps)
    loss = cfg.loss
    if cfg.stage == 0:
        t_dist = LogNormal(loss.P_mean, loss.P_std)
    elif cfg.stage == 1:
        t_dist = LogNormal(loss.P_mean, loss.P_std, loss.t_min, loss.t_max)
    else:
        t_dist = TruncatedLogStudentT(loss.t_prime, loss.t_max, loss.psi_scale, loss.psi_nu)
        nb_total = n_boundary(tc.batch, loss.rho)
    edges = loss_t_edges(cfg.t_max)

    def save():
        # Every rank's dropout RNG goes into the checkpoint, so a resumed DDP run continues each rank's stream.
        rng_torch = [torch.get_rng_state()]
        rng_cuda = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
        if world > 1:
            rng_torch, rng_cuda = [None] * world, [None] * world if rng_cuda else []
            dist.all_gather_object(rng_torch, torch.get_rng_state())
            if device.type == "cuda":
                dist.all_gather_object(rng_cuda, torch.cuda.get_rng_state(device).cpu())
        if rank != 0:
            return
        state = {
            "config": to_json(cfg), "step": step, "shape": list(shape),
            "model": f.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "rng": {"data": gen.get_state(), "torch": rng_torch, "cuda": rng_cuda},
        }
        if init_source is not None:
            state["init_source"] = init_source  # {'path', 'step', 'sha256'} of init_from when this run started
        if f0 is not None:
            state["teacher"] = f0.state_dict()
        checkpoint.save(ckpt_file, state)

    bar = tqdm(total=end, initial=step, disable=not progress or rank != 0, desc=f"stage {cfg.stage} [{cfg.name}]",
               dynamic_ncols=True)
    t_last, step_last = time.perf_counter(), step
    while step < end:
        i = step + tc.step_offset
        lr = inverse_sqrt_lr(i, tc.lr, tc.lr_t_ref)
        for g in opt.param_groups:
            g["lr"] = lr
        # Global batch (identical on every rank), then this rank's rows.
        idx = torch.randint(len(data), (tc.batch,), generator=gen)
        eps = torch.randn((tc.batch, *shape), generator=gen)
        if cfg.stage == 2:
            t, is_b = tcm_times(tc.batch, loss.t_prime, loss.rho, t_dist, gen)
        else:
            t = t_dist.sample(tc.batch, gen)
        lo, hi = rank * b_rank, (rank + 1) * b_rank
        ratio = None
        if cfg.stage == 1:
            ratio = ect_ratio(i, loss.q, loss.d, loss.ratio_max)
        elif cfg.stage == 2:
            ratio = loss.ratio  # held at ratio_max for all of stage 2 (TCM App. E)
        opt.zero_grad(set_to_none=True)
        outs = []
        for k, a in enumerate(range(lo, hi, b_gpu)):
            sl = slice(a, a + b_gpu)
            x_b, eps_b, t_b = data.get(idx[sl]), eps[sl].to(device), t[sl].to(device)
            sync = world == 1 or a + b_gpu >= hi
            ctx = f_train.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                if cfg.stage == 0:
                    out = edm_loss(f_train, x_b, eps_b, t_b, n_total=tc.batch)
                elif cfg.stage == 1:
                    out = ect_loss(f_train, x_b, eps_b, t_b, ratio, loss.c, loss.weighting, n_total=tc.batch, f_minus=f)
                else:
                    out = tcm_loss(f_train, f0, x_b, eps_b, t_b, is_b[sl].to(device), loss.t_prime, ratio, loss.c,
                                   loss.weighting, loss.w_b, loss.teacher_passes, n_boundary_total=nb_total,
                                   n_consistency_total=tc.batch - nb_total, f_minus=f)
                scaler.scale(out.loss * world).backward()
            outs.append(out)
        loss_value = sum(o.loss.detach() for o in outs)
        if world > 1:
            dist.all_reduce(loss_value)
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in f.parameters() if p.grad is not None])
        finite = bool(torch.isfinite(loss_value)) and (scaler.is_enabled() or bool(torch.isfinite(grad_norm)))
        if not finite:  # reported, never patched: how many per-sample losses and gradient tensors were non-finite
            row = {"kind": "nonfinite", "step": step, "loss": float(loss_value), "grad_norm": float(grad_norm),
                   "nonfinite_samples": int(sum((~torch.isfinite(o.per_sample)).sum() for o in outs)),
                   "nonfinite_grads": sum(int(not torch.isfinite(p.grad).all()) for p in f.parameters()
                                          if p.grad is not None)}
            if rank == 0:
                _append_metrics(metrics_path, row)
            bar.close()
            raise NonFiniteError(f"non-finite loss or gradient at step {step} (loss={float(loss_value)}, grad norm="
                                 f"{float(grad_norm)}); the last checkpoint in {run_dir} is intact. Lower train.lr, "
                                 f"check the data, or use precision='fp32'.")
        scaler.step(opt)
        scaler.update()
        step += 1
        beta = ema_beta(step + tc.step_offset, tc.ema, tc.ema_beta, tc.ema_gamma)
        update_ema(ema, f, beta)
        bar.update(1)

        if step % tc.log_every == 0 or step == end:
            now = time.perf_counter()
            all_out = _cat(outs)
            row = {"kind": "train", "step": step, "stage": cfg.stage, "loss": float(loss_value), "lr": lr,
                   "grad_norm": float(grad_norm), "ema_beta": beta,
                   "sec_per_step": (now - t_last) / max(step - step_last, 1), "loss_by_t": _loss_by_t(all_out, edges)}
            row["images_per_sec"] = tc.batch / row["sec_per_step"]
            if ratio is not None:
                row["ratio"] = ratio
            if cfg.stage == 2:
                b = all_out.is_boundary
                row["loss_boundary"] = float(all_out.per_sample[b].mean()) if bool(b.any()) else None
                row["loss_consistency"] = float(all_out.per_sample[~b].mean())
                row["teacher_rows"] = sum(o.teacher_rows for o in outs)
            t_last, step_last = now, step
            bar.set_postfix(loss=f"{row['loss']:.4g}")
            if rank == 0:
                _append_metrics(metrics_path, row)
            if on_log is not None and rank == 0:
                on_log(row)
        if eval_fn is not None and eval_every and (step % eval_every == 0 or step == end):
            if rank == 0:
                row = {"kind": "eval", "step": step, **eval_fn(step, ema)}
                _append_metrics(metrics_path, row)
                if on_log is not None:
                    on_log(row)
        if step % tc.ckpt_every == 0 and step < end:
            save()
    bar.close()
    save()
    if world > 1:
        dist.barrier()
    last = {}
    if metrics_path.exists():
        lines = metrics_path.read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
    return TrainResult(run_dir, step, last)


def _cat(outs: list[LossOut]) -> LossOut:
    if len(outs) == 1:
        return outs[0]
    cat = lambda name: None if getattr(outs[0], name) is None else torch.cat([getattr(o, name) for o in outs])
    return LossOut(sum(o.loss for o in outs), cat("per_sample"), cat("t"), cat("r"), cat("is_boundary"),
                   sum(o.teacher_rows for o in outs))

