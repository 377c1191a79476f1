"""The training loop of all three stages: `train(cfg, run_dir)`; call it again with the same arguments to continue.

Per step (global batch B, drawn from one seeded generator so that any number of data-parallel ranks sees the same
global batch; each rank takes its rows): the stage object (`tcmlab.stages`) draws t and computes the loss at
iteration i = step + train.step_offset (docs/decisions.md §11). Then gradient norm, a stop on any non-finite loss or
gradient (reported in metrics.jsonl, never zeroed; docs/decisions.md §20), the optimiser step with lr =
inverse_sqrt_lr(i) (under fp16, a step the gradient scaler skips is logged as `fp16_skip`), and the EMA update.
A checkpoint (model, EMA, optimiser, step, all RNG states, in stage 2 θ0 with its source, and the compute spent) is
written atomically every `ckpt_every` steps, before every evaluation during training (`eval_fn`), at the end of every
call, and when SIGTERM/SIGINT asks the run to stop.
Every `log_every` steps a `train` row goes to metrics.jsonl: loss (and per-t-bin losses), lr, gradient norm and
grad_norm_max (the largest since the last row; a spike gets a `grad_spike` row of its own, `tcmlab.health`), EMA β,
sec_per_step, and the compute that reached this state, summed over the calls that trained the run: images_seen
(steps × B), train_seconds (wall clock of the training loop: evaluations, start-up and the final save left out, and so
is what a killed call did after its last checkpoint), device_seconds (× ranks), since_step where counting began later
than step 0 (a checkpoint of an older tcmlab), and on CUDA peak_memory_mib: the most memory one process allocated
during the training steps since the last row (the largest over the ranks).

The run directory is locked for the whole call (`tcmlab.rundir`); nothing in it is written until the config, the
data, `init_from` and the device have been checked, so a failed start leaves it as it was.
Under `torchrun` the process group is formed from the environment (`tcmlab.distributed`): rank 0 writes,
gradients are averaged, diagnostics are reduced over ranks.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import math
import shutil
import signal
import threading
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import checkpoint, rundir
from .config import RECOVERY_FIELDS, RunConfig, TrainConfig, to_json
from .data import load_data
from .distributed import agree, all_reduce_max, all_reduce_sum, process_group
from .edm_import import check_against, load_edm_pickle
from .ema import ema_beta, update_ema
from .health import SPIKE_WINDOW, grad_spike
from .losses import LossOut
from .model import CKPT_NAME, build_model, checkpoint_path, frozen_copy, load_state, model_state
from .precision import float32_math
from .schedules import inverse_sqrt_lr
from .speedups import compile_settings, compiled, match_optimizer_formats, memory_format
from .stages import make_stage


def loss_t_edges(t_max: float) -> np.ndarray:
    """Bins of the loss-by-t diagnostic: 8 log-spaced bins over [0.002, T]."""
    return np.geomspace(0.002, t_max, 9)


class NonFiniteError(FloatingPointError):
    """Training hit a non-finite loss or gradient; the last checkpoint is untouched. what: the step and values;
    hint: what to do, for train's callers (a sweep gives its own)."""

    def __init__(self, what: str, hint: str = ""):
        super().__init__(f"{what} {hint}".strip())
        self.what, self.hint = what, hint


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped training after a finished step and a written checkpoint; train again to resume."""

    def __init__(self, signum: int, step: int, run_dir: Path, target: int | None = None, sliced: bool = False):
        self.signum, self.step, self.run_dir = signum, step, run_dir
        to = f" (to step {target})" if target else ""
        again = (f"Run it again without --steps (python: steps=None) to resume{to}; with --steps k each call trains "
                 f"at most k more steps." if sliced else f"Run the same command again to resume{to}.")
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint written in "
                         f"{run_dir}. {again}")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    last: dict  # the last metrics row


def make_optimizer(params, tc: TrainConfig, foreach: bool = True) -> torch.optim.Optimizer:
    """The run's optimiser (`TrainConfig.optimizer`, lr, betas; docs/decisions.md §15), with torch's multi-tensor
    (foreach) update on every device. torch picks it by default on CUDA only; on the CPU it makes a stage-1 step
    1.07–1.11× faster than the per-parameter loop (`python -m tcmlab.bench --compare-foreach`, docs/performance.md).
    The two agree to float rounding, not bit for bit."""
    cls = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam}[tc.optimizer]
    return cls(params, lr=tc.lr, betas=tc.betas, foreach=foreach)


@contextlib.contextmanager
def _stop_requests():
    """Turn SIGTERM/SIGINT into a request (a one-element list holding the signal number) that the loop honours after
    the current step. Only the main thread can install handlers; elsewhere signals keep their usual effect."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, lambda signum, frame: requested.append(signum))
    try:
        yield requested
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _init_state(cfg: RunConfig, model, shape) -> tuple[dict, dict]:
    """The weights a stage starts from, after checking they fit, and where they came from ({'path', 'step',
    'sha256'}): the previous stage's EMA (stage 1 from 0 or 1; stage 2 from 1), or for stage 1 the EMA network of an
    official EDM pickle (`tcmlab.edm_import`, read without executing anything)."""
    path = checkpoint_path(cfg.init_from)
    if path.suffix == ".pkl":
        if cfg.stage != 1:
            raise ValueError(f"init_from={path} is an EDM pickle: it can start stage 1 only (stage 2 needs a stage-1 "
                             f"tcmlab run)")
        weights, _ = load_edm_pickle(path)
        check_against(weights, model, path)
        step = 0
    else:
        state, src = load_state(path, "cpu")
        allowed = {1: (0, 1), 2: (1,)}[cfg.stage]
        if src.stage not in allowed:
            raise ValueError(f"init_from={cfg.init_from} is a stage-{src.stage} run; stage {cfg.stage} needs a "
                             f"stage-{' or '.join(map(str, allowed))} run")
        # Dropout may change between stages (ECT's CIFAR-10 stage 1 uses 0.2 on EDM's 0.13); the architecture not.
        if replace(src.net, dropout=cfg.net.dropout) != cfg.net or tuple(state["shape"]) != tuple(shape):
            raise ValueError(f"init_from={cfg.init_from} has an incompatible network or data shape (its net="
                             f"{src.net}, shape={tuple(state['shape'])}; this run: net={cfg.net}, shape={shape})")
        weights, step = model_state(state, "ema"), int(state["step"])
        if cfg.stage == 2:
            _warn_unpaired(cfg, src)
        if step < src.train.steps:
            warnings.warn(f"init_from={cfg.init_from} is at step {step} of its {src.train.steps}: this stage starts "
                          f"from its EMA at step {step} (recorded in the checkpoint's init_source)", stacklevel=3)
    checkpoint.check_finite(weights, f"init_from={path} (EMA weights)")
    # 'resolved': the absolute path, so that `python -m tcmlab info` finds the file from any folder
    return weights, {"path": str(path), "resolved": str(path.resolve()), "step": step,
                     "sha256": checkpoint.sha256(path)}


def _recovery_hint(run_dir: Path, ckpt_file: Path, tc, step: int) -> str:
    """What to do after a non-finite step: from the last checkpoint with a lower lr (or in fp32), named. At step 0 no
    update has been made, so the lr cannot be the cause."""
    fp32 = "" if tc.precision == "fp32" else " (or --set train.precision=fp32 --allow-change train.precision)"
    if step == 0 and not ckpt_file.exists():
        return (f"It failed at step 0, before any update, so the learning rate is not the cause: check the loss "
                f"settings (loss.*, e.g. a value at the edge of its range), the data and init_from"
                f"{'' if tc.precision == 'fp32' else ', or train in fp32'}. No checkpoint was written, so the same "
                f"--outdir {run_dir} takes the changed config.")
    if not ckpt_file.exists():
        return (f"No checkpoint was written yet, so nothing is lost: check the data, or run again with a lower "
                f"train.lr{'' if tc.precision == 'fp32' else ' or precision fp32'} (the same --outdir {run_dir} "
                f"takes the new config).")
    return (f"The last checkpoint in {run_dir} is intact. Check the data, or go on from it with a lower lr: --set "
            f"train.lr=... --allow-change train.lr{fp32} (python: train or launch.run_stage with "
            f"allow_change=('train.lr',)).")


def _warn_unpaired(cfg: RunConfig, src: RunConfig) -> None:
    """Stage 2 goes on from stage 1's end (TCM App. E): the same T, r held at stage 1's ratio_max, the same distance
    c and weighting, the same data. Each that differs is named in a warning (an ablation may want it; a forgotten
    override in one stage only should not pass unseen)."""
    pairs = (("loss.t_max", src.loss.t_max, cfg.loss.t_max), ("loss.ratio (stage 1: loss.ratio_max)",
             src.loss.ratio_max, cfg.loss.ratio), ("loss.c", src.loss.c, cfg.loss.c),
             ("loss.weighting", src.loss.weighting, cfg.loss.weighting), ("data.name", src.data.name, cfg.data.name),
             ("data.toy", src.data.toy if src.data.name == "toy2d" else None,
              cfg.data.toy if cfg.data.name == "toy2d" else None))
    differ = [f"{name} {theirs!r} in stage 1, {ours!r} here" for name, theirs, ours in pairs if theirs != ours]
    if differ:
        warnings.warn(f"init_from={cfg.init_from}: stage 2 does not continue stage 1's setting: {'; '.join(differ)}. "
                      f"TCM App. E keeps them; set them equal (--set) unless this is the experiment", stacklevel=4)


EVAL_WAIT = datetime.timedelta(hours=6)  # how long the other ranks wait for rank 0's evaluation during training
TRAIN_WRITES = (CKPT_NAME, "config.json", "metrics.jsonl", rundir.HOLDER_NAME)  # the files train() writes atomically


def _restore_dropout_rng(rng: dict, rank: int, world: int, device, seed: int, step: int) -> None:
    """This rank's dropout RNG from a checkpoint's per-rank states. A rank the checkpoint has no state for (resumed
    on more ranks than it was written by) starts its own stream, seeded from (seed, rank, step): reusing another
    rank's state would give the same dropout masks to the same rows of every rank's slice."""
    saved_torch, saved_cuda = rng["torch"], rng["cuda"]
    if len(saved_torch) != world and rank == 0:
        warnings.warn(f"resuming on {world} rank(s) from a checkpoint written by {len(saved_torch)}: the dropout "
                      f"streams differ from a run on {world} rank(s) from the start (ranks without a saved state "
                      f"start new ones)", stacklevel=3)
    if rank < len(saved_torch):
        torch.set_rng_state(saved_torch[rank])
    else:
        torch.manual_seed((seed * 1000 + rank) * 1_000_003 + step)  # CPU and every CUDA device
    if device.type == "cuda" and rank < len(saved_cuda):
        torch.cuda.set_rng_state(saved_cuda[rank], device)
    elif device.type == "cuda":
        torch.cuda.manual_seed((seed * 1000 + rank) * 1_000_003 + step)


def _nonfinite_grads(f: torch.nn.Module) -> int:
    """How many parameter gradients hold a non-finite value (reported, never zeroed: docs/decisions.md §20)."""
    return sum(int(not torch.isfinite(p.grad).all()) for p in f.parameters() if p.grad is not None)


def _diagnostics(outs: list[LossOut], edges: np.ndarray, device) -> dict:
    """Loss by t-bin and (stage 2) boundary / consistency means and θ0 rows, summed over micro-batches and ranks."""
    per = torch.cat([o.per_sample for o in outs]).float()
    t = torch.cat([o.t for o in outs]).detach().cpu().numpy()
    bins = torch.as_tensor(np.clip(np.digitize(t, edges) - 1, 0, len(edges) - 2), device=per.device)
    nb = len(edges) - 1
    sums = torch.zeros(2 * nb + 5, dtype=torch.float64, device=per.device)
    sums[:nb].index_add_(0, bins, per.double())
    sums[nb:2 * nb].index_add_(0, bins, torch.ones_like(per, dtype=torch.float64))
    if outs[0].is_boundary is not None:
        b = torch.cat([o.is_boundary for o in outs])
        sums[2 * nb:] = torch.stack([per[b].double().sum(), b.sum().double(), per[~b].double().sum(),
                                     (~b).sum().double(), torch.tensor(float(sum(o.teacher_rows for o in outs)),
                                                                        dtype=torch.float64, device=per.device)])
    s = all_reduce_sum(sums).tolist()
    mean = lambda total, count: total / count if count else None
    row = {"loss_by_t": [mean(s[k], s[nb + k]) for k in range(nb)]}
    if outs[0].is_boundary is not None:
        row.update(loss_boundary=mean(s[2 * nb], s[2 * nb + 1]), loss_consistency=mean(s[2 * nb + 2], s[2 * nb + 3]),
                   teacher_rows=int(s[2 * nb + 4]))
    return row


def _only_lock_files(run_dir: Path) -> bool:
    return all(p.name in (rundir.LOCK_NAME, rundir.HOLDER_NAME) for p in run_dir.iterdir())


def train(cfg: RunConfig, run_dir: str | Path, *, steps: int | None = None, device: str | torch.device | None = None,
          progress: bool = True, on_log: Callable[[dict], None] | None = None,
          eval_fn: Callable[[int, torch.nn.Module], dict] | None = None, eval_every: int = 0,
          allow_change: tuple[str, ...] = ()) -> TrainResult:
    """Train one stage in `run_dir`, resuming from its checkpoint if there is one.

    steps: run at most this many more steps in this call (default: until cfg.train.steps). on_log(row) receives
    every metrics row (live plots). eval_fn(step, ema_model) -> {name: value} runs every `eval_every` steps and at
    the end; its results are logged as rows with kind='eval'. device: default CUDA when present (under torchrun,
    the GPU of LOCAL_RANK). allow_change: fields of `config.RECOVERY_FIELDS` ("train.lr", "train.precision") this
    call may change in a run that has a checkpoint (`rundir.check_same_run`; logged as a row with
    kind='config_change'). Raises `Interrupted` (a KeyboardInterrupt) after checkpointing on SIGTERM/SIGINT.
    """
    run_dir = Path(run_dir)
    if cfg.stage == 2 and cfg.init_from is None and not (run_dir / CKPT_NAME).exists():  # a checkpoint holds θ0
        raise ValueError("stage 2 needs init_from: the stage-1 run directory (or its latest.safetensors) whose EMA "
                         "weights become θ0 and the student's initialisation")
    if cfg.stage == 1 and cfg.data.name == "cifar10" and cfg.init_from is None and not cfg.from_scratch:
        raise ValueError("CIFAR-10 stage 1 starts from a diffusion model (TCM App. E): set init_from to EDM's "
                         "edm-cifar10-32x32-uncond-vp.pkl (or a tcmlab stage-0/1 run), or say from_scratch=True "
                         "(CLI: --set from_scratch=true)")
    if cfg.stage == 1 and cfg.init_from is None and not cfg.from_scratch and not (run_dir / CKPT_NAME).exists():
        warnings.warn("stage 1 starts from random weights: no init_from was given. ECT tunes a diffusion model "
                      "(TCM App. E): give the stage-0 run (or EDM's checkpoint) as init_from, or set from_scratch=True "
                      "(CLI: --set from_scratch=true) to train from scratch without this warning", stacklevel=2)
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer (more steps to run in this call), got {steps!r}")
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} is a file: give a folder (it is created if missing)")
    with process_group(device) as (rank, world, device):
        tc = cfg.train
        if tc.batch % world:
            raise ValueError(f"train.batch={tc.batch} must be divisible by the number of processes ({world})")
        b_rank = tc.batch // world
        b_gpu = tc.batch_gpu or b_rank
        if b_rank % b_gpu:
            raise ValueError(f"train.batch_gpu={b_gpu} must divide the per-process batch {b_rank}")
        created = not run_dir.exists()
        with contextlib.ExitStack() as held:
            error = None
            if rank == 0:
                try:
                    run_dir.mkdir(parents=True, exist_ok=True)
                    held.enter_context(rundir.RunLock(run_dir))  # one trainer per run directory, for the whole call
                except (OSError, RuntimeError) as e:
                    error = e
            agree(rank, world, error)
            held.enter_context(float32_math(tc.precision, tc.cudnn_benchmark))  # TF32 off unless 'tf32'
            if tc.compile:
                held.enter_context(compile_settings())  # recompile limit, replayable dropout draws; restored after
            return _train(cfg, run_dir, rank, world, device, b_rank, b_gpu, created, steps, progress, on_log,
                          eval_fn, eval_every, tuple(allow_change))


def _train(cfg, run_dir, rank, world, device, b_rank, b_gpu, created, steps, progress, on_log, eval_fn, eval_every,
           allow_change):
    tc = cfg.train
    stage = make_stage(cfg)
    ckpt_file = run_dir / CKPT_NAME
    metrics_path = run_dir / "metrics.jsonl"
    error = None
    try:  # every check before anything is written into the run directory
        # The checkpoint is read on the CPU (RNG states must be CPU byte tensors); load_state_dict copies to device.
        state, stored = load_state(ckpt_file, "cpu") if ckpt_file.exists() else (None, None)
        if cfg.stage == 2 and cfg.init_from is None and state is not None and "teacher" not in state:
            raise ValueError(f"{ckpt_file} holds no copy of θ0 (written by an older tcmlab): give the stage-1 run "
                             f"it started from as init_from ({stored.init_from}) once; the run keeps θ0 from then on")
        changes = rundir.check_same_run(run_dir, cfg, state, allow_change)
        if stored is not None:  # init_from is not read again (or it was refused): the run keeps its own origin
            cfg = replace(cfg, init_from=stored.init_from)
        data = load_data(cfg.data).to(device)
        shape = data.shape
        torch.manual_seed(tc.seed)  # the initial weights depend on train.seed alone, not on earlier RNG use
        f = build_model(cfg, shape).to(device, memory_format=memory_format(tc.channels_last, 4)).train()
        f0, init_source = None, None
        if state is not None:
            for which in ("model", "ema", "teacher"):
                if which in state:
                    checkpoint.check_finite(state[which], f"{ckpt_file} ({which})")
            init_source = state.get("init_source")
        elif cfg.init_from is not None:
            init_weights, init_source = _init_state(cfg, f, shape)
            f.load_state_dict(init_weights)
        if stage.needs_teacher:
            # θ0: the stage-1 EMA weights, frozen (TCM Eq. 5), kept in this run's checkpoint so that a resumed run
            # trains against the same teacher even if the stage-1 run moved on or is gone (docs/decisions.md §10).
            # Dropout on (official code) or off (paper), docs/decisions.md §8.
            f0 = frozen_copy(f)
            if state is not None and "teacher" in state:
                f0.load_state_dict(state["teacher"])
            elif state is not None:  # a checkpoint written before θ0 was kept in the run: θ0 from init_from, once
                warnings.warn(f"{ckpt_file} holds no copy of θ0 (written by an older tcmlab): θ0 is read from "
                              f"init_from={cfg.init_from} and kept in the run from now on", stacklevel=2)
                f0.load_state_dict(_init_state(cfg, f, shape)[0])
            f0.train(cfg.loss.teacher_dropout)
    except Exception as e:
        error = e
    try:
        agree(rank, world, error)
        if world > 1:  # every rank continues the same state (a node that cannot see rank 0's checkpoint: step 0)
            seen = [None] * world
            dist.all_gather_object(seen, None if state is None else int(state["step"]))
            if len(set(seen)) > 1:
                which = ", ".join(f"rank {r}: " + ("none" if s is None else f"step {s}") for r, s in enumerate(seen))
                raise ValueError(f"the processes of this run read different checkpoints in {run_dir} ({which}): "
                                 f"every node must see the same run directory; put --outdir on a file system all "
                                 f"nodes share")
    except BaseException:
        if rank == 0 and created and run_dir.exists() and _only_lock_files(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)  # a failed first start leaves no folder behind
        raise
    ema = frozen_copy(f).eval()
    opt = make_optimizer(f.parameters(), tc)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")
    gen = torch.Generator().manual_seed(tc.seed)  # global-batch randomness: indices, ε, t, boundary positions
    torch.manual_seed(tc.seed * 1000 + rank)  # dropout masks: per-rank seeds
    step, state_compute, state_health = 0, None, {}
    if state is not None:
        f.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        match_optimizer_formats(opt)  # channels_last state for channels_last weights (the checkpoint is contiguous)
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        gen.set_state(state["rng"]["data"])
        step = int(state["step"])
        state_compute = state.get("compute")
        state_health = state.get("health") or {}  # none in a checkpoint of an older tcmlab: the window starts empty
        _restore_dropout_rng(state["rng"], rank, world, device, tc.seed, step)
        del state
    end = tc.steps if steps is None else min(tc.steps, step + steps)
    # A call with no step to train on a run whose config is unchanged (config_diff: speed and bookkeeping options and
    # fields the run does not read aside) writes nothing: the checkpoint stays byte for byte (a stage 2 paired with it
    # by init_source's sha256 stays paired), and config.json and metrics.jsonl record no change it did not make.
    idle = stored is not None and step >= end and not rundir.config_diff(stored, cfg, init_free=True)
    if rank == 0:  # checks passed: now the run directory may change
        for tmp in checkpoint.stale_temporaries(run_dir, TRAIN_WRITES):  # a killed save's copy; we hold the lock
            warnings.warn(f"removing {tmp} ({tmp.stat().st_size / 2**20:.1f} MiB), left by a save that was killed "
                          f"mid-write; the checkpoint it would have replaced is intact", stacklevel=2)
            tmp.unlink()
        checkpoint.atomic_write_text(run_dir / "config.json", to_json(stored if idle else cfg))
        rundir.truncate_metrics(metrics_path, step)
        rundir.set_aside_outputs(run_dir, step)  # eval.jsonl rows and sample PNGs of a later state

    f_train = f
    if world > 1:
        f_train = torch.nn.parallel.DistributedDataParallel(f, device_ids=[device] if device.type == "cuda" else None,
                                                            broadcast_buffers=False)
    # the networks the loss calls: the student (through DDP), θ⁻ (the target pass) and θ0; compiled if asked. EMA,
    # checkpoints and gradients use f itself.
    f_train, f_minus, f0_loss = compiled(f_train, f, f0) if tc.compile else (f_train, f, f0)
    fmt = memory_format(tc.channels_last, len(shape) + 1)
    edges = loss_t_edges(cfg.t_max)
    # Compute spent on this run, across resumes: wall-clock seconds of training (evaluations left out) and the same
    # times the ranks (GPU-seconds on GPUs), counted from `since_step` (a checkpoint of an older tcmlab has none).
    compute = dict(state_compute) if state_compute else {"train_seconds": 0.0, "device_seconds": 0.0,
                                                         "since_step": step}
    # start: when the loop begins; peak: CUDA memory peak of the training steps before an evaluation since the last row
    # eval: seconds of evaluations since the last train row (sec_per_step leaves them out)
    clock = {"start": time.perf_counter(), "first_step": step, "peak": 0, "eval": 0.0}
    saved_at = None  # the step of this call's last save

    def spent() -> dict:
        # a call that trains no step adds nothing
        seconds = time.perf_counter() - clock["start"] if step > clock["first_step"] else 0.0
        return {**compute, "train_seconds": compute["train_seconds"] + seconds,
                "device_seconds": compute["device_seconds"] + seconds * world}

    def save():
        # Every rank's dropout RNG goes into the checkpoint, so a resumed DDP run continues each rank's stream.
        nonlocal saved_at
        saved_at = step
        rng_torch = [torch.get_rng_state()]
        rng_cuda = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
        if world > 1:
            rng_torch, rng_cuda = [None] * world, [None] * world if rng_cuda else []
            dist.all_gather_object(rng_torch, torch.get_rng_state())
            if device.type == "cuda":
                dist.all_gather_object(rng_cuda, torch.cuda.get_rng_state(device).cpu())
        if rank != 0:
            return
        out = {
            "config": to_json(cfg), "step": step, "shape": list(shape),
            "model": f.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "rng": {"data": gen.get_state(), "torch": rng_torch, "cuda": rng_cuda},
        }
        if init_source is not None:
            out["init_source"] = init_source  # {'path', 'resolved', 'step', 'sha256'} of init_from at the start
        if f0 is not None:
            out["teacher"] = f0.state_dict()
        out["compute"] = spent()
        out["health"] = {"recent_grad_norms": list(recent_norms), "grad_norm_max": norm_max}
        checkpoint.save(ckpt_file, out)

    def log(row):
        if rank == 0:
            rundir.append_metrics(metrics_path, row)
            if on_log is not None:
                on_log(row)

    # health.grad_spike's window and the largest norm since the last row, carried by the checkpoint
    recent_norms = collections.deque(state_health.get("recent_grad_norms", ()), maxlen=SPIKE_WINDOW)
    norm_max = state_health.get("grad_norm_max")
    recovered = stored is not None and any(getattr(stored.train, k) != getattr(cfg.train, k) for k in RECOVERY_FIELDS)
    if recovered:
        save()  # the checkpoint takes the new lr/precision first, so the config_change row never outlives it
    if changes and not idle:
        log({"kind": "config_change", "step": step, "changes": changes})  # visible in the run's own record

    # Evaluations during training run on rank 0 alone; a checkpoint is written before each, so that an evaluation
    # that fails or is killed loses no training. The other ranks wait for it in a collective of their own group,
    # whose timeout (EVAL_WAIT) is far longer than the default group's (NCCL: 10 minutes; dFID on 50,000 CIFAR-10
    # images at 10 times can take longer), so that the wait does not end the job.
    evaluates = eval_fn is not None and bool(eval_every)
    if world > 1:  # the same decision on every rank: the save before an evaluation is a collective
        evaluates = bool(all_reduce_max(float(evaluates), device))
    eval_group = dist.new_group(timeout=EVAL_WAIT) if world > 1 and evaluates else None

    def run_eval(save_first: bool) -> Exception | None:
        """Rank 0 evaluates the EMA weights at `step` (logged as a row of kind 'eval'), after a checkpoint of that
        state if `save_first`; the time and memory of both are kept out of training's, and the evaluation's random
        draws out of training's streams. Its error is returned, not raised, so that the other ranks hear of it in the
        next collective instead of waiting for rank 0."""
        t_eval = time.perf_counter()
        peak_before_eval = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        if save_first:
            save()
        error = None
        if rank == 0 and eval_fn is not None:
            try:  # torch-fidelity's DataLoader seeds itself from the global RNG: the same run with or without
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # eval_every trains
                    log({"kind": "eval", "step": step, **eval_fn(step, ema)})                    # the same
            except Exception as e:
                error = e
        t_eval = time.perf_counter() - t_eval
        clock["start"] += t_eval  # the compute record leaves it out, and so does sec_per_step (clock["eval"])
        clock["eval"] += t_eval
        if device.type == "cuda":  # and so does peak_memory_mib: the steps' peak kept, the evaluation's not
            clock["peak"] = max(clock["peak"], peak_before_eval)
            torch.cuda.reset_peak_memory_stats(device)
        return error

    def share(signum: int, failed: Exception | None, group) -> tuple[int, Exception | None]:
        """In one collective, every rank learns the largest stop signal and whether rank 0's evaluation failed."""
        if world > 1:
            flag = torch.tensor([signum, failed is not None], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            signum = int(flag[0].item())
            if failed is None and flag[1].item():
                failed = RuntimeError(f"rank 0's evaluation at step {step} failed (its error is in its output)")
        return signum, failed

    # A resumed run whose checkpoint is at an evaluation step without its evaluation (the one before it failed or
    # was stopped: the checkpoint is written first) evaluates it now.
    if evaluates and step > 0 and (step % eval_every == 0 or step == end):
        rows = rundir.read_metrics(metrics_path) if rank == 0 else []
        missing = not any(r.get("kind") == "eval" and r.get("step") == step for r in rows)
        if world > 1:
            missing = bool(all_reduce_max(float(missing), device))
        if missing:
            _, failed = share(0, run_eval(save_first=False), eval_group)  # its checkpoint: the one resumed from
            if failed is not None:
                raise failed
    bar = tqdm(total=end, initial=step, disable=not progress or rank != 0, desc=f"stage {cfg.stage} [{cfg.name}]",
               dynamic_ncols=True)
    t_last, step_last = time.perf_counter(), step
    clock["start"], clock["eval"] = t_last, 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with _stop_requests() as stop:
        while step < end:
            i = step + tc.step_offset
            lr = inverse_sqrt_lr(i, tc.lr, tc.lr_t_ref)
            for g in opt.param_groups:
                g["lr"] = lr
            # Global batch (identical on every rank), then this rank's rows.
            idx = torch.randint(len(data), (tc.batch,), generator=gen)  # with replacement, docs/decisions.md §15
            eps = torch.randn((tc.batch, *shape), generator=gen)
            t, is_b = stage.sample_times(tc.batch, gen)
            lo, hi = rank * b_rank, (rank + 1) * b_rank
            opt.zero_grad(set_to_none=True)
            outs = []
            for a in range(lo, hi, b_gpu):
                sl = slice(a, a + b_gpu)
                x_b, eps_b = data.get(idx[sl]).contiguous(memory_format=fmt), eps[sl].to(device, memory_format=fmt)
                t_b = t[sl].to(device)
                is_b_b = None if is_b is None else is_b[sl].to(device)
                sync = world == 1 or a + b_gpu >= hi
                with f_train.no_sync() if not sync else contextlib.nullcontext():
                    out = stage.loss(f_train, x_b, eps_b, t_b, is_b_b, i, tc.batch, f_minus=f_minus, f0=f0_loss)
                    scaler.scale(out.loss * world).backward()
                outs.append(out)
            loss_value = all_reduce_sum(sum(o.loss.detach() for o in outs))
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in f.parameters() if p.grad is not None])
            g = float(grad_norm)  # one read to the host per step, as the finiteness check has always made
            finite = bool(torch.isfinite(loss_value)) and (scaler.is_enabled() or math.isfinite(g))
            if not finite:  # reported, never patched: how many per-sample losses and gradient tensors were non-finite
                log({"kind": "nonfinite", "step": step, "loss": float(loss_value), "grad_norm": float(grad_norm),
                     "nonfinite_samples": int(all_reduce_sum(sum((~torch.isfinite(o.per_sample)).sum() for o in outs))),
                     "nonfinite_grads": _nonfinite_grads(f)})
                bar.close()
                raise NonFiniteError(f"non-finite loss or gradient at step {step} (loss={float(loss_value)}, grad "
                                     f"norm={float(grad_norm)}).", _recovery_hint(run_dir, ckpt_file, tc, step))
            scale = scaler.get_scale() if scaler.is_enabled() else None
            scaler.step(opt)
            scaler.update()
            if scale is not None and scaler.get_scale() < scale:  # fp16: the scaler skipped this optimiser step
                log({"kind": "fp16_skip", "step": step, "scale": scale, "next_scale": scaler.get_scale(),
                     "nonfinite_grads": _nonfinite_grads(f)})
            step += 1
            beta = ema_beta(step + tc.step_offset, tc.ema, tc.ema_beta, tc.ema_gamma)
            update_ema(ema, f, beta)
            bar.update(1)
            median = grad_spike(recent_norms, g)
            if median is not None:  # reported, not acted on (docs/decisions.md §20)
                log({"kind": "grad_spike", "step": step, "grad_norm": g, "median_grad_norm": median,
                     "window": len(recent_norms), "loss": float(loss_value)})
            if math.isfinite(g):  # an fp16 step the scaler skipped has none
                recent_norms.append(g)
                norm_max = g if norm_max is None else max(norm_max, g)

            if step % tc.log_every == 0 or step == end:
                now = time.perf_counter()
                row = {"kind": "train", "step": step, "stage": cfg.stage, "world": world, "loss": float(loss_value),
                       "lr": lr, "grad_norm": g, "grad_norm_max": norm_max, "ema_beta": beta,
                       "sec_per_step": (now - t_last - clock["eval"]) / max(step - step_last, 1),
                       **_diagnostics(outs, edges, device)}
                row["images_per_sec"] = tc.batch / row["sec_per_step"]
                row.update(images_seen=step * tc.batch, **{k: v for k, v in spent().items()
                                                            if k != "since_step" or v > 0})  # counted from since_step
                if device.type == "cuda":  # the most one process's tensors held since the previous row (any rank)
                    peak = max(clock["peak"], torch.cuda.max_memory_allocated(device))
                    row["peak_memory_mib"] = all_reduce_max(peak, device) / 2 ** 20
                    torch.cuda.reset_peak_memory_stats(device)
                    clock["peak"] = 0
                if stage.ratio(i) is not None:
                    row["ratio"] = stage.ratio(i)
                t_last, step_last, norm_max, clock["eval"] = now, step, None, 0.0
                bar.set_postfix(loss=f"{row['loss']:.4g}")
                log(row)
            due_eval = evaluates and (step % eval_every == 0 or step == end)
            failed = None
            if due_eval:
                failed = run_eval(save_first=True)
            # every rank stops after the same step, or the checkpoint's collectives would hang
            signum, failed = share(stop[0] if stop else 0, failed, eval_group if due_eval else None)
            if failed is not None:
                bar.close()
                raise failed
            if signum and step < end:  # at `end` the call has done its work: the final save below, then a normal end
                bar.close()
                if saved_at != step:
                    save()
                raise Interrupted(signum, step, run_dir, tc.steps, sliced=steps is not None and end < tc.steps)
            if step % tc.ckpt_every == 0 and step < end and saved_at != step:
                save()
        bar.close()
        # The final save, still under the stop handlers: a SIGTERM/SIGINT now waits for it (the steps since the last
        # checkpoint are kept), and the call ends normally. None after an idle call (above), nor at a step saved
        # already (the recovery save at the start of a call that trained nothing, the save before an evaluation).
        if not idle and saved_at != step:
            save()
    if world > 1:
        dist.barrier()
    rows = rundir.read_metrics(metrics_path) if rank == 0 else []
    return TrainResult(run_dir, step, rows[-1] if rows else {})
