"""A run directory: one trainer at a time, the config it holds, and its metrics stream.

- `RunLock(run_dir)`: an OS file lock (`filelock`) held for a whole `train()` call; a second trainer fails at once
  with the directory and the holder (pid, host, start time). The OS drops the lock when its process dies, so a
  killed trainer never leaves a stale lock behind.
- `check_same_run(run_dir, cfg, stored)`: refuse a directory that holds a different run. The checkpoint's own
  config is the truth; `config.json` (a copy for people and tools) alone, from a run that stopped before its first
  checkpoint, gives way to a new config with a warning (nothing was trained under it).
- `read_metrics(path)` / `append_metrics(path, row)` / `truncate_metrics(path, step)`: metrics.jsonl, one JSON row
  per line. A torn last line (power loss, full disk) is dropped with a warning; any other bad line is an error that
  names the file and the line. On every start the stream is cut back to the checkpoint's step, so it always
  matches the state training continues from; the rows cut go to metrics.discarded.jsonl.
- `set_aside_outputs(run_dir, step)`: likewise for eval.jsonl rows and sample PNGs of a later step than the one
  training continues from (eval.discarded.jsonl, samples_*.discarded-step<N>.png).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import warnings
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from filelock import FileLock, Timeout

from . import checkpoint
from .config import FREE_FIELDS, RECOVERY_FIELDS, RunConfig, from_dict, to_dict, unread_fields, with_free_fields_of
from .model import CKPT_NAME
from .viz import SAMPLE_NAMES, png_step

RECOVERY_NAMES = tuple(f"train.{k}" for k in RECOVERY_FIELDS)  # what allow_change may name
LOCK_NAME = ".tcmlab.lock"
HOLDER_NAME = ".tcmlab.lock.holder"


class RunLock:
    """Exclusive use of a run directory for the duration of a `with` block."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.lock = FileLock(str(self.run_dir / LOCK_NAME), timeout=0)

    def __enter__(self):
        try:
            self.lock.acquire()
        except Timeout:
            holder = (self.run_dir / HOLDER_NAME)
            who = holder.read_text().strip() if holder.exists() else "unknown process"
            raise RuntimeError(f"run directory {self.run_dir} is in use by another trainer ({who}). Wait for it to "
                               f"finish or stop it; use another run directory to train something else.") from None
        checkpoint.atomic_write_text(self.run_dir / HOLDER_NAME,
                                     f"pid {os.getpid()} on {socket.gethostname()}, since {time.ctime()}\n")
        return self

    def __exit__(self, *exc):
        self.lock.release()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def stored_config(run_dir: Path, ckpt_state: dict | None) -> tuple[RunConfig | None, str]:
    """The config a run directory holds and where it was read: the checkpoint's, else config.json's, else None."""
    if ckpt_state is not None:
        return from_dict(json.loads(ckpt_state["config"])), f"{run_dir}/{CKPT_NAME}"
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return None, ""
    try:
        return from_dict(json.loads(path.read_text())), str(path)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a valid tcmlab config ({e}). There is no checkpoint beside it: delete "
                         f"{path} (or the whole folder) to start this run afresh.") from None


def config_diff(old: RunConfig, new: RunConfig, init_free: bool = False, also_free: tuple[str, ...] = ()) -> list[str]:
    """"field old -> new" for every field in which `new` is another run than `old`. The fields of
    `config.FREE_FIELDS`, the TrainConfig fields in `also_free` and the fields neither config reads
    (`config.unread_fields`: net.channel_mult of an MLP) never count, nor init_from if `init_free` (a run with a
    checkpoint does not read it again)."""
    new = with_free_fields_of(new, old)
    new = replace(new, train=replace(new.train, **{k: getattr(old.train, k) for k in also_free}))
    a, b = _flat(to_dict(old)), _flat(to_dict(new))
    for key in set(unread_fields(old)) & set(unread_fields(new)):
        a.pop(key, None), b.pop(key, None)
    if init_free:
        a.pop("init_from"), b.pop("init_from")
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_same_run(run_dir: Path, cfg: RunConfig, ckpt_state: dict | None,
                   allow_change: tuple[str, ...] = ()) -> list[str]:
    """Refuse a run directory that holds a different run. Between calls only train.steps may change (to extend a
    run; never below the checkpoint's step), data.root, the fields of `config.FREE_FIELDS` (speed and bookkeeping
    options), those of `config.RECOVERY_FIELDS` named in `allow_change` (e.g. "train.lr") and, once a checkpoint
    holds the run, init_from (it is not read again; the run keeps its own); fields neither config reads do not count
    (`config_diff`). A folder with a config.json but no checkpoint (a run that failed before its first one) holds
    nothing to protect: any config may start there. Returns the changes, each also warned."""
    bad = [name for name in allow_change if name not in RECOVERY_NAMES]
    if bad:
        raise ValueError(f"allow_change takes {', '.join(RECOVERY_NAMES)}, got {', '.join(map(repr, bad))}: other "
                         f"fields define the run (train.steps, data.root and "
                         f"{', '.join('train.' + k for k in FREE_FIELDS)} may change without asking)")
    old, where = stored_config(run_dir, ckpt_state)
    if old is None:
        return []
    allowed = tuple(name.removeprefix("train.") for name in allow_change)
    # Once a checkpoint holds the run, init_from is not read again (stage 2 keeps θ0 inside; older stage-2
    # checkpoints without it still read θ0 from init_from): the same folder given relative to another working
    # directory, or a moved stage-1 run, is the same run. Its origin stays recorded in the checkpoint's init_source.
    init_free = ckpt_state is not None and (cfg.stage != 2 or "teacher" in ckpt_state)
    diff = config_diff(old, replace(cfg, train=replace(cfg.train, steps=old.train.steps)), init_free, allowed)
    if diff and ckpt_state is None:  # config.json only: the run stopped before its first checkpoint
        warnings.warn(f"{run_dir}: {where} names another config ({', '.join(diff)}), but no checkpoint was written "
                      f"under it: starting from step 0 with this one", stacklevel=3)
        return [f"config.json replaced before any checkpoint: {', '.join(diff)}"]
    if old.stage != cfg.stage:  # e.g. stage 2's --outdir pointed at its own teacher: never advise deleting that
        here = (Path(run_dir).resolve(), (Path(run_dir) / CKPT_NAME).resolve())
        teacher = " (the run this stage starts from)" if cfg.init_from and Path(cfg.init_from).resolve() in here else ""
        raise ValueError(f"{run_dir} holds a stage-{old.stage} run{teacher}: give this stage-{cfg.stage} run its "
                         f"own run directory (e.g. --outdir {Path(run_dir).parent / f'stage{cfg.stage}'})")
    if diff:
        names = [d.split(" ", 1)[0] for d in diff]
        recoverable = [k for k in names if k in RECOVERY_NAMES]
        # the hint only where following it is enough: every field that differs may be allowed to change
        hint = (f" To go on from its checkpoint with the new {' and '.join(recoverable)} (say after a non-finite "
                f"step), name {'them' if len(recoverable) > 1 else 'it'}: "
                f"{' '.join('--allow-change ' + k for k in recoverable)} (python: train or launch.run_stage with "
                f"allow_change={tuple(recoverable)!r}).") if recoverable and recoverable == names else ""
        raise ValueError(f"{run_dir} holds a different run (per {where}; differs in: {', '.join(diff)}). Use a new "
                         f"run directory, or delete this one to start over. Only train.steps, data.root and the speed "
                         f"and bookkeeping options ({', '.join('train.' + k for k in FREE_FIELDS)}) may change between "
                         f"calls.{hint}")
    reached = int(ckpt_state["step"]) if ckpt_state is not None else 0
    if cfg.train.steps < reached:
        raise ValueError(f"{run_dir} is at step {reached}, past train.steps={cfg.train.steps}: a run cannot be "
                         f"shortened. Give train.steps >= {reached} (or {old.train.steps}, its own), or use "
                         f"another run directory.")
    changed = [f"train.{k} {getattr(old.train, k)!r} -> {getattr(cfg.train, k)!r}" for k in FREE_FIELDS + allowed
               if getattr(old.train, k) != getattr(cfg.train, k)]
    if cfg.data.root != old.data.root:
        changed.append(f"data.root {old.data.root!r} -> {cfg.data.root!r}")
    if init_free and cfg.init_from is not None and cfg.init_from != old.init_from:  # None: not given, nothing to say
        changed.append(f"init_from {old.init_from!r} -> {cfg.init_from!r} (not read: the run continues from its "
                       f"checkpoint and keeps {old.init_from!r} in its config)")
    if changed:
        warnings.warn(f"{run_dir}: continuing with {', '.join(changed)}", stacklevel=3)
    return changed


def read_metrics(path: str | Path) -> list[dict]:
    """All rows of a metrics.jsonl ([] if absent). A torn last line is dropped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        lines = path.read_text().split("\n")  # a complete file ends with "\n", so its last element is ""
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): it is not a tcmlab record; "
                         f"move it aside (the checkpoint does not depend on it)") from None
    rows = []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if k == len(lines) - 1:  # the last line, never finished
                warnings.warn(f"{path}: dropped a torn last line ({len(line)} characters, {e.msg}); it was being "
                              f"written when the process stopped", stacklevel=2)
                break
            raise ValueError(f"{path} line {k + 1} is not valid JSON ({e.msg}). Repair or delete that line "
                             f"(metrics are diagnostics; the checkpoint does not depend on them).") from None
        if not isinstance(rows[-1], dict):
            raise ValueError(f"{path} line {k + 1} is JSON but not an object (a row is {{\"kind\": ..., \"step\": "
                             f"...}}): repair or delete that line (metrics are diagnostics; the checkpoint does not "
                             f"depend on them).")
        step = rows[-1].get("step", 0)
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"{path} line {k + 1}: its step is {step!r}, not an integer: repair or delete that line "
                             f"(metrics are diagnostics; the checkpoint does not depend on them).")
    return rows


def append_metrics(path: Path, row: dict) -> None:
    """Append one row as one line, written and flushed in one call."""
    append_metrics_text(path, json.dumps(row) + "\n")


def append_metrics_text(path: Path, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text)
        fh.flush()


DISCARDED_NAME = "metrics.discarded.jsonl"


# rows that report an attempt at the step after theirs ("step" counts the steps done): a nonfinite report, an fp16 skip
ATTEMPT_KINDS = ("nonfinite", "fp16_skip")


def after_step(row: dict, step: int) -> bool:
    """The row reports on a step after `step` (one a run resumed at `step` does again)."""
    done = row.get("step", 0)
    return done >= step if row.get("kind") in ATTEMPT_KINDS else done > step


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the rows up to `step` (the checkpoint's; 0 when there is none), so metrics match the state. The rows
    of the steps after it (a `nonfinite` report of the step that failed among them, `ATTEMPT_KINDS`) are appended to
    metrics.discarded.jsonl beside it, each with `resumed_from: step`: what a failed stretch logged is never lost."""
    rows = read_metrics(path)
    if rows or path.exists():
        _set_aside_rows(path, rows, [after_step(r, step) for r in rows], path.with_name(DISCARDED_NAME), step)


def _cut_id(path: Path, step: int) -> str:
    """Names one cut of `path` back to `step` as the file is now (its bytes, inode and modification time). A cut
    rewrites `path` into a new file, so the next cut has another id, also when a deterministic resume logged the same
    rows again; a cut to another step (a deleted checkpoint: back to 0) is another cut of the same file."""
    st = path.stat()
    return f"{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}-{st.st_ino}-{st.st_mtime_ns}-{step}"


def _rows_of_cut(discarded: Path, cut_id: str) -> int:
    """How many rows of the cut `cut_id` `discarded` holds already (lines that are not JSON objects are skipped)."""
    n = 0
    for line in discarded.read_text().splitlines() if discarded.exists() else ():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        n += isinstance(row, dict) and row.get("cut") == cut_id
    return n


def _set_aside_rows(path: Path, rows: list[dict], cut: list[bool], discarded: Path, step: int) -> None:
    """Append the rows flagged in `cut` to `discarded`, each with `resumed_from: step` and the cut's id (`_cut_id`),
    then rewrite `path` with the others (atomically). A start killed between the two left `path` as it was: the next
    start finds the same id in `discarded` and appends only the rows that are not there yet, so no row is kept twice."""
    if any(cut):
        cut_id = _cut_id(path, step)
        if discarded.exists() and discarded.stat().st_size and not discarded.read_bytes().endswith(b"\n"):
            append_metrics_text(discarded, "\n")  # a torn last line stays a line of its own
        for r in [r for r, c in zip(rows, cut) if c][_rows_of_cut(discarded, cut_id):]:
            append_metrics(discarded, {**r, "resumed_from": step, "cut": cut_id})
    checkpoint.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r, c in zip(rows, cut) if not c))


EVAL_NAME = "eval.jsonl"
EVAL_LOCK_NAME = ".tcmlab.eval.lock"  # held while eval.jsonl is written: `evaluate` appends under it too


def _free_name(path: Path) -> Path:
    """path, or path with -2, -3, ... before its suffix: the first name not yet taken."""
    k, new = 1, path
    while new.exists():
        k += 1
        new = path.with_name(f"{path.stem}-{k}{path.suffix}")
    return new


def eval_step(row) -> int | None:
    """The training step of an eval.jsonl row (its card's), or None for a row that names none."""
    card = row.get("card") if isinstance(row, dict) else None
    step = card.get("step") if isinstance(card, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def set_aside_outputs(run_dir: Path, step: int) -> list[str]:
    """Set aside what `evaluate` and `sample` wrote of a state after `step` (the checkpoint's; 0 without one, e.g.
    after a damaged checkpoint was deleted), so that a restarted run's folder never shows another state's scores or
    pictures as its own: eval.jsonl rows of a later training step go to eval.discarded.jsonl with `resumed_from:
    step`, and a sample PNG of a later step (or of an unknown one, when the run starts from scratch) is renamed
    samples_*.discarded-step<N>.png. Nothing is deleted; an eval.jsonl that cannot be read is left as it is, with a
    warning (it is a record, not what training continues from). Returns what moved, each also warned."""
    run_dir = Path(run_dir)
    moved = []
    path = run_dir / EVAL_NAME
    with FileLock(str(run_dir / EVAL_LOCK_NAME)) if path.exists() else nullcontext():
        try:
            rows = read_metrics(path)
        except ValueError as e:
            warnings.warn(f"{e} Left as it is: rows in it may be of a later state than step {step}.", stacklevel=3)
            rows = []
        later = [(eval_step(r) or -1) > step for r in rows]
        if any(later):
            _set_aside_rows(path, rows, later, run_dir / "eval.discarded.jsonl", step)
            moved.append(f"{sum(later)} row(s) of {EVAL_NAME} -> eval.discarded.jsonl")
    for name in SAMPLE_NAMES:
        path = run_dir / name
        if not path.is_file():
            continue
        made_at = png_step(path)  # None: written by an older tcmlab, or not by tcmlab
        if (step == 0) if made_at is None else made_at > step:
            new = _free_name(path.with_name(f"{path.stem}.discarded-step{made_at or 'unknown'}.png"))
            os.replace(path, new)
            moved.append(f"{name} -> {new.name}")
    if moved:
        warnings.warn(f"{run_dir}: starting from step {step}, set aside what was made of a later state: "
                      f"{'; '.join(moved)}", stacklevel=3)
    return moved
