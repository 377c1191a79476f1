"""Run a training stage in one process or under `torchrun` from Python (notebooks), with the same live metrics.

`run_stage(cfg, run_dir, gpus=1, ...)` calls `train()` in this process when gpus == 1; with gpus > 1 it starts
`python -m torch.distributed.run --standalone --nproc-per-node=gpus -m tcmlab train --config ... --outdir run_dir`
and streams the rows it appends to metrics.jsonl into `on_log` (the live plots) while it runs. Either way it first
says whether the run directory already holds a finished run (reused, not retrained) or a partial one (resumed).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

from . import checkpoint, rundir
from .display import Progress
from .config import RunConfig, to_json
from .model import CKPT_NAME, checkpoint_path, load_state
from .train import train


def existing_step(cfg: RunConfig, run_dir: Path, allow_change: tuple[str, ...] = ()) -> int:
    """The step `run_dir`'s checkpoint is at (0 where there is none); a checkpoint of a different run is refused
    (`rundir.check_same_run`; allow_change as there)."""
    ckpt = Path(run_dir) / CKPT_NAME
    if not ckpt.exists():
        return 0
    state = load_state(ckpt, "cpu")[0]
    rundir.check_same_run(Path(run_dir), cfg, state, allow_change)  # never reuse a different run by mistake
    return int(state["step"])


def teacher_note(cfg: RunConfig, run_dir: Path) -> str | None:
    """For an existing stage-2 run: a note when the stage-1 checkpoint its init_from names is no longer the θ0 it
    trained against (stage 1 was trained on or retrained since), i.e. stage 1 and stage 2 are no longer paired."""
    src = checkpoint.init_source(Path(run_dir) / CKPT_NAME)
    if cfg.stage != 2 or cfg.init_from is None or not src:
        return None
    try:
        now = checkpoint_path(cfg.init_from)
    except FileNotFoundError:
        return None
    if not now.is_file() or checkpoint.sha256(now) == src["sha256"]:
        return None
    return (f"{run_dir} was trained against θ0 = {src['path']} at step {src['step']}, but {now} now holds another "
            f"checkpoint (step {checkpoint.header(now).get('step')}): this stage 2 is not paired with the current "
            f"stage 1. Use another `out` (or delete {run_dir}) to train stage 2 from it.")


def describe_existing(cfg: RunConfig, run_dir: Path, step: int | None = None) -> str:
    """What `run_stage` will do with `run_dir`: train from scratch, resume at step k, or reuse a finished run."""
    step = existing_step(cfg, run_dir) if step is None else step
    if step == 0:
        return f"training {run_dir} from step 0 to {cfg.train.steps}"
    if step >= cfg.train.steps:
        return f"found {run_dir} at step {step}: reused, not retrained"
    return f"found {run_dir} at step {step}: resuming to {cfg.train.steps}"


def _tail(path: Path, seen: int, on_log) -> int:
    """Feed rows past the first `seen` complete lines of metrics.jsonl to on_log; return the new count."""
    if not path.exists():
        return seen
    lines = path.read_text().split("\n")[:-1]  # the part after the last newline may be half written
    if len(lines) < seen:  # truncated back to the checkpoint at start
        seen = 0
    for line in lines[seen:]:
        if line.strip() and on_log is not None:
            on_log(json.loads(line))
    return len(lines)


# Seconds torchrun gets to end after SIGTERM before it is killed. torchrun itself gives its trainers 30 s to
# checkpoint and exit before it kills them (the previous checkpoint stays intact: writes are atomic).
STOP_TIMEOUT = 120.0


def train_torchrun(cfg: RunConfig, run_dir: str | Path, gpus: int, *, steps: int | None = None,
                   on_log: Callable[[dict], None] | None = None, dfid_every: int = 0, dfid_n: int | None = None,
                   dfid_t_prime: float | None = None, data_root: str | None = None, poll: float = 1.0,
                   allow_change: tuple[str, ...] = ()) -> dict:
    """Train under torchrun with `gpus` processes (GPUs when present, else CPU processes with gloo); stream metrics
    rows to `on_log`; return the last row. allow_change: as `train`'s. A failure raises with the tail of torchrun's
    output. If this call ends early (KeyboardInterrupt, an exception from `on_log`), torchrun is stopped with SIGTERM
    — its trainers write a checkpoint and release the run directory — and killed if it has not ended after
    STOP_TIMEOUT seconds."""
    run_dir = Path(run_dir)
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="tcmlab-config-", delete=False) as fh:
        fh.write(to_json(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", "-m", "tcmlab",
           "train", "--config", fh.name, "--outdir", str(run_dir)]
    if steps:
        cmd += ["--steps", str(steps)]
    if dfid_every:
        cmd += ["--dfid-every", str(dfid_every)] + (["--dfid-n", str(dfid_n)] if dfid_n else [])
        cmd += ["--dfid-t-prime", repr(float(dfid_t_prime))] if dfid_t_prime is not None and cfg.stage < 2 else []
    if data_root:
        cmd += ["--data-root", str(data_root)]
    for name in allow_change:
        cmd += ["--allow-change", name]
    log = tempfile.TemporaryFile("w+")
    p = None
    try:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        seen = 0
        while p.poll() is None:
            time.sleep(poll)
            seen = _tail(run_dir / "metrics.jsonl", seen, on_log)
        _tail(run_dir / "metrics.jsonl", seen, on_log)
        if p.returncode != 0:
            log.seek(0)
            lines = log.read().splitlines()
            # the trainers' own `error:` lines first (a bad config, a wrong path): torchrun's summary after them is
            # longer than the tail and names no cause
            bare = (re.sub(r"^\[rank\d+\]:\s*", "", line.strip()) for line in lines)  # torch's excepthook prefix
            errors = list(dict.fromkeys(line for line in bare if line.startswith("error:")))
            tail = "\n".join(lines[-30:])
            cause = "".join(f"{e}\n" for e in errors)
            raise RuntimeError(f"torchrun with {gpus} processes failed (exit {p.returncode}):\n{cause}"
                               f"{'--- the end of its output:' if cause else ''}\n{tail}")
    finally:
        if p is not None and p.poll() is None:  # interrupted, or on_log raised: stop torchrun and its trainers
            p.terminate()  # SIGTERM, which torchrun passes on: each trainer checkpoints and exits (train.Interrupted)
            try:
                p.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        log.close()
        Path(fh.name).unlink(missing_ok=True)
    rows = rundir.read_metrics(run_dir / "metrics.jsonl")
    return rows[-1] if rows else {}


def run_stage(cfg: RunConfig, run_dir: str | Path, *, gpus: int = 1, steps: int | None = None,
              on_log: Callable[[dict], None] | None = None, eval_fn=None, eval_every: int = 0, dfid_n: int | None = None,
              dfid_t_prime: float | None = None, data_root: str | None = None, progress: bool = True,
              allow_change: tuple[str, ...] = ()) -> str:
    """Train (or resume, or reuse) one stage in `run_dir`, in-process or under torchrun; returns what it did.
    allow_change: as `train`'s (go on from the checkpoint with another train.lr or precision).

    In-process, `eval_fn` runs every `eval_every` steps; under torchrun the trainer builds the dFID callback itself
    from the run's data (every `eval_every` steps on `dfid_n` images, at `metrics.dfid_ts_for(T, t′)` with t′ the
    run's own in stage 2 and `dfid_t_prime` before it). Progress is drawn from the metrics rows
    (`display.Progress`), so a notebook saved after the run shows where it ended, not a frozen bar."""
    run_dir = Path(run_dir)
    try:
        start = existing_step(cfg, run_dir, tuple(allow_change))
    except ValueError as e:
        if "holds a different run" not in str(e):
            raise
        raise ValueError(f"{e} From a notebook: give its `out` parameter another folder (papermill: -p out DIR)"
                         ) from None
    what = describe_existing(cfg, run_dir, start)
    print(f"[tcmlab] {what}" + (f" on {gpus} processes (torchrun)" if gpus > 1 else ""), flush=True)
    note = teacher_note(cfg, run_dir)
    if note:
        print(f"[tcmlab] WARNING: {note}", flush=True)
        warnings.warn(note, stacklevel=2)
    if start >= cfg.train.steps:
        for row in rundir.read_metrics(run_dir / "metrics.jsonl") if on_log is not None else ():
            on_log(row)  # the live plots show the reused run's history
        return what
    end = cfg.train.steps if steps is None else min(cfg.train.steps, start + steps)
    desc = f"stage {cfg.stage} [{cfg.name}] {run_dir.name}"
    if end < cfg.train.steps:
        desc += f" (this call: to step {end} of {cfg.train.steps})"
    bar = Progress(desc, start, end) if progress else None

    def log(row):
        if bar is not None:
            bar.on_log(row)
        if on_log is not None:
            on_log(row)
    try:
        if gpus > 1:
            train_torchrun(cfg, run_dir, gpus, steps=steps, on_log=log, dfid_every=eval_every, dfid_n=dfid_n,
                           dfid_t_prime=dfid_t_prime, data_root=data_root, allow_change=tuple(allow_change))
        else:
            train(cfg, run_dir, steps=steps, progress=False, on_log=log, eval_fn=eval_fn, eval_every=eval_every,
                  allow_change=tuple(allow_change))
    except BaseException as e:
        if bar is not None:
            bar.close(f" — stopped: {type(e).__name__}")
        raise
    if bar is not None:
        bar.close(" — done")
    return what
