"""Sweeps: a grid of runs over seeds and config fields, trained and evaluated in parallel, resumable, one table.

`python -m tcmlab sweep SPEC` (or `run_sweep(load_spec(path))`). SPEC is a TOML file (`sweeps/ci.toml`):

    preset = "ci"                      # config preset (tcmlab.config.PRESETS)
    seeds = [0, 1]                     # train.seed of every stage of a chain
    out = "runs/sweeps/ci"             # output folder (relative to the working directory; --out overrides)
    stages = [0, 1, 2]                 # default: the preset's stages (cifar10: [1, 2])
    control = true                     # add the control point (below)
    [stage2]                           # one table per stage: steps, base overrides `set`, `grid`
    steps = 20                         # train.steps of that stage (default: the preset's)
    set = { "train.lr" = 5e-4 }        # fixed overrides, section.field as in `--set`
    grid = { "loss.t_prime" = [0.5, 1.0], "loss.w_b" = [0, 0.1] }   # product: 4 points per stage-1 run
    # or a list of tables, the union of their products (one-at-a-time ablations; fields a table leaves out keep
    # the stage's default): grid = [{ "loss.w_b" = [0, 0.01, 1] }, { "loss.rho" = [0.1, 0.5] }]  -> 3 + 2 points
    [eval]                             # EvalSpec: n, t_mid, seed, batch, dfid, draws, every, kinds, data_root,
                                       # inception_weights
    n = 50

Expansion (`expand`): per seed, stage k's points are every (stage-(k−1) point) × (stage-k grid combination), and each
starts from its stage-(k−1) run (`init_from`). So stage 0 → 1 is trained once per seed (or once per stage-1 grid
combination), and all stage-2 points of a seed share it. The *control* point of a stage-1 run is that run continued
with the stage-1 loss for stage2.steps more steps: its run directory starts as a copy of the stage-1 checkpoint
(model, EMA, optimiser, RNG states, step) and trains to stage1.steps + stage2.steps, i.e. exactly the stage-1 run
trained for longer from the same seed (same lr, EMA and ratio schedule), at the cost of stage2.steps steps only.
It answers "is stage 2 better than the same compute spent on more stage 1?".

Layout: `<out>/seed<S>/<point>/` is a run directory, `<out>/seed<S>/<point>.json` its evaluation (1- and 2-step
FID/KID, dFID_t at `metrics.dfid_ts(T)` and, for stage 2, at t′; each with its eval card and the real-vs-real floor
at its n). Rebuilt from the JSONs on every call: `<out>/results.csv`, one row per point × metric with columns point,
kind (stage0/stage1/stage2/control), stage, seed, one column per grid field ('s2.loss.t_prime'), steps (training
steps of the checkpoint), metric (fid_1step, fid_2step, kid_1step, kid_2step, dfid; an evaluated stage-0 point has
fid_heun, kid_heun instead: EDM's Heun sampler), t (dFID's noise level), value (with `[eval] draws` > 1, the mean
over noise draws), value_sd (FID's spread over those draws; empty for one draw), kid_std (KID's spread over subsets),
n, nonfinite (how many of the scored samples, over all draws, held a non-finite value; empty in an evaluation
written before this was counted), floor (real-vs-real FD at floor_n; None for KID and for CIFAR-10), floor_n, card
(the eval card, JSON);
`<out>/summary.csv` (`summarize`: mean, std, count over seeds per grid point and metric; draw_sd)
and `<out>/summary.md` (its sample-quality rows as a markdown table); with `[eval] every`, `<out>/curves.csv` (dFID_t
and 1-step FID during training, `curves_table`); `<out>/timing.csv` (steps each run trained itself and their median
seconds per step, `timing_table`); `<out>/figures/` (FID and dFID_t, mean ± std over seeds, and one
figure over training per point); `<out>/failures.txt` (the tracebacks of this call's failed tasks, if any). A table
that would lose rows of the one there (a grid value gone, a point left out or not evaluated now) or has none is first
renamed NAME.stale (results.csv with its summary.csv and summary.md), and so is an evaluation about to be replaced
(other eval settings, config or step): `<point>.json.stale`; an earlier `.stale` is never overwritten (.stale.2, …),
and each call says in one line what it set aside.

Resuming: a point whose checkpoint is at its target step and whose JSON matches its config and the eval settings
is skipped; a partial run resumes from its checkpoint (`train` does that); a trained run without a current JSON is
only evaluated. Runs that need it train on worker processes (one torch thread each; `--workers`), on submitit's
local executor, or on SLURM (`--executor slurm`); a task starts once the tasks it depends on have finished
(`tcmlab.sweep_dispatch`).
Ctrl-C or SIGTERM stops the running trainings after a checkpoint (the same command resumes them); with the processes
executor, running evaluations finish first (an evaluation's JSON is written whole or not at all). A changed spec value
that changes a finished run's config makes that point fail ("holds a run of another config"), and out's tables are not
rebuilt (they stay those of the spec that trained it): use a new `out`. Only train.steps may grow: extending a stage
does not retrain the runs that start from it, but every call names those trained from another step of the run they start
from (`left_out`: θ0 of a stage-2 run, the initial weights of a stage-1 run, and the runs that start from those): they
are no longer paired, and the tables leave them out.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import shutil
import statistics
import time
import tomllib
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import RunConfig, from_dict, preset, to_dict
from .sweep_spec import KINDS, TOP_FIELDS, EvalSpec, SpecError, StageSpec, SweepSpec, parse_spec  # noqa: F401
from .sweep_table import figures, read_csv, summarize, summary_figures, summary_markdown, write_csv  # noqa: F401

from .sweep_dispatch import EXECUTORS, TASK_ERROR, Dispatch, schedule, submitter, waiting_on  # noqa: F401

# ---------------------------------------------------------------------------------------------------------------------
# Points: one run directory each


@dataclass(frozen=True)
class Point:
    """One run of the sweep. values: (column, value) of every grid field along its chain (columns 's2.loss.t_prime');
    parent_dir: the run it starts from (init_from), or for the control the stage-1 run it continues."""

    id: str
    kind: str
    seed: int
    values: tuple[tuple[str, Any], ...]
    cfg: RunConfig
    run_dir: str
    parent: str | None = None
    parent_dir: str | None = None
    evaluate: bool = True

    @property
    def stage(self) -> int:
        return self.cfg.stage

    @property
    def results_path(self) -> Path:
        """The point's evaluation JSON, beside its run directory."""
        return Path(self.run_dir + ".json")


def _fmt(v) -> str:
    """A grid value in a directory name: floats exactly (repr), tuples joined by 'x', no path separators."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, tuple):
        return "x".join(_fmt(x) for x in v)
    return (repr(v) if isinstance(v, float) else str(v)).replace(os.sep, "_")


def _short_names(spec: SweepSpec) -> dict[str, str]:
    """Directory-name label of each grid field: the field name alone where that is unambiguous in the spec."""
    keys = [key for _, st in spec.stages for key in st.keys]
    tail = lambda key: key.rpartition(".")[2]
    return {key: tail(key) if [tail(k) for k in keys].count(tail(key)) == 1 else key for key in keys}


def _apply(cfg: RunConfig, items) -> RunConfig:
    """Set already-typed (key, value) items on a config (validated by the config classes)."""
    top, sections = {}, {}
    for key, value in items:
        if key in TOP_FIELDS:
            top[key] = value
        else:
            section, _, name = key.partition(".")
            sections.setdefault(section, {})[name] = value
    new = {s: dataclasses.replace(getattr(cfg, s), **kw) for s, kw in sections.items()}
    return dataclasses.replace(cfg, **new, **top)


def _stage_config(spec: SweepSpec, k: int, seed: int, parent: Point | None, combo) -> RunConfig:
    st = spec.stage(k)
    cfg = preset(spec.preset, k)
    where = f"{spec.path}: [stage{k}] " + ", ".join(f"{key} = {_fmt(v)}" for key, v in combo)
    try:
        cfg = _apply(cfg, st.set + tuple(combo))
        cfg = _apply(cfg, [("train.seed", seed), ("train.steps", st.steps or cfg.train.steps)])
        if parent is not None:
            cfg = dataclasses.replace(cfg, init_from=parent.run_dir)
    except ValueError as e:
        raise SpecError(f"{where.rstrip()}: {e}") from None
    return cfg


def _control(spec: SweepSpec, s1: Point) -> Point:
    """Stage 1 continued for stage 2's step count (see the module docstring)."""
    extra = _stage_config(spec, 2, s1.seed, s1, ()).train.steps
    cfg = dataclasses.replace(s1.cfg, train=dataclasses.replace(s1.cfg.train, steps=s1.cfg.train.steps + extra))
    name = "control" + Path(s1.run_dir).name[2:]
    run_dir = str(Path(s1.run_dir).parent / name)
    return Point(f"seed{s1.seed}/{name}", "control", s1.seed, s1.values, cfg, run_dir, s1.id, s1.run_dir,
                 "control" in spec.eval.kinds)


def expand(spec: SweepSpec) -> list[Point]:
    """Every point of the sweep, parents before children: per seed, each stage's grid under each point of the
    previous stage (the stage-0 and stage-1 runs of a seed are shared by its stage-2 points), then the controls."""
    short = _short_names(spec)
    points = []
    for seed in spec.seeds:
        level: list[Point | None] = [None]
        for k, st in spec.stages:
            new_level = []
            for parent in level:
                for combo in st.combos:
                    cfg = _stage_config(spec, k, seed, parent, combo)
                    values = (parent.values if parent else ()) + tuple((f"s{k}.{key}", v) for key, v in combo)
                    label = "__".join(f"{short[c.partition('.')[2]]}={_fmt(v)}" for c, v in values)
                    name = f"s{k}" + (f"__{label}" if label else "")
                    run_dir = str(Path(spec.out) / f"seed{seed}" / name)
                    new_level.append(Point(f"seed{seed}/{name}", f"stage{k}", seed, values, cfg, run_dir,
                                           parent.id if parent else None, parent.run_dir if parent else None,
                                           f"stage{k}" in spec.eval.kinds))
            if k == 2 and spec.control:
                new_level += [_control(spec, p) for p in level]
            points += new_level
            level = [p for p in new_level if p.kind != "control"]
    seen: dict[str, Point] = {}
    for p in points:  # values that differ only in a path separator ('a/b', 'a_b') would write into one folder
        if p.run_dir in seen:
            values = lambda q: ", ".join(f"{c}={v!r}" for c, v in q.values)
            raise SpecError(f"the grid points ({values(seen[p.run_dir])}) and ({values(p)}) share the run directory "
                            f"{p.run_dir}: give grid values that differ in more than '/' against '_'")
        seen[p.run_dir] = p
    return points


def grid_columns(spec: SweepSpec) -> list[str]:
    """The table's grid columns, 's<stage>.<field>', in spec order."""
    return [f"s{k}.{key}" for k, st in spec.stages for key in st.keys]


def load_spec(path: str | Path, out: str | Path | None = None) -> SweepSpec:
    """Read and check a sweep spec (TOML); every point's config is built once here, so a bad value fails before any
    training. `out` replaces the spec's output folder."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise SpecError(f"sweep spec {path} {what}: give the path of a TOML file like sweeps/ci.toml")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"sweep spec {path} is not valid TOML ({e}); see sweeps/ci.toml for the format") from None
    spec = parse_spec(raw, str(path), out)
    for p in expand(spec):  # the 2-step sampler goes T -> t_mid: t_mid >= T would fail every evaluation, after training
        if p.evaluate and p.cfg.stage > 0 and not spec.eval.t_mid < p.cfg.t_max:
            raise SpecError(f"{path}: [eval] t_mid = {spec.eval.t_mid:g} must be below T = {p.cfg.t_max:g} of "
                            f"{p.id} (2-step sampling goes T -> t_mid)")
    return spec


# ---------------------------------------------------------------------------------------------------------------------
# Status and plan


def init_step(run_dir: str | Path) -> int | None:
    """The step of the run whose EMA this run started from (its checkpoint's init_source: θ0 for stage 2, the
    initial weights for stage 1), or None."""
    from . import checkpoint
    from .model import CKPT_NAME

    src = checkpoint.init_source(Path(run_dir) / CKPT_NAME)
    return int(src["step"]) if src else None


def left_out(points: list[Point], states: dict[str, str]) -> dict[str, str]:
    """Points whose runs no longer belong to the chain the spec describes, each with a line saying why; the tables
    leave them out (`report`), the runs stay on disk. One started from another step of its parent run than the
    spec's steps for it (the earlier stage was extended after it ran: a stage-2 run's θ0, a stage-1 run's initial
    weights; a stale stage-2 run is not paired with the control and the other stage-2 points); one that starts from
    a 'changed' run (`status`: trained with another config than the spec now gives); and every point that starts
    from one of those. A control continues its stage-1 checkpoint, so only its parent counts. states: `status`."""
    by_id = {p.id: p for p in points}
    out: dict[str, str] = {}
    for p in points:  # parents before children (`expand`)
        parent = by_id.get(p.parent)
        if parent is None:
            continue
        if parent.id in out:
            out[p.id] = f"{p.id} starts from {parent.id}, which is left out (above): the tables leave it out too"
            continue
        if states.get(parent.id) == "changed":
            out[p.id] = (f"{p.id} starts from {parent.id}, whose run was trained with another config than the spec "
                         f"now gives: its scores are not those of the spec's chain, and the tables leave it out")
            continue
        got, want = (None if p.kind == "control" else init_step(p.run_dir)), parent.cfg.train.steps
        if got is not None and got != want:
            what = "trained against θ0 =" if p.kind == "stage2" else "started from the EMA of"
            out[p.id] = (f"{p.id} {what} {parent.id} at step {got}, but {parent.id} now trains to {want}: its "
                         f"scores are not those of the spec's chain (nor paired with the other points'), and the "
                         f"tables leave it out (delete {p.run_dir} and {p.results_path.name}, and the runs that "
                         f"start from it, to retrain it, or use a new out)")
    return out


def checkpoint_step(run_dir: str | Path) -> int | None:
    """The step of a run directory's checkpoint from its header alone (no tensors read); None if there is none,
    0 if it cannot be read (training it then reports the damage with what to do)."""
    from . import checkpoint
    from .model import CKPT_NAME

    path = Path(run_dir) / CKPT_NAME
    if not path.is_file():
        return None
    try:
        return int(checkpoint.header(path)["step"])
    except Exception:
        return 0


def _config_json(cfg: RunConfig) -> dict:
    return json.loads(json.dumps(to_dict(cfg)))


def read_results(point: Point) -> dict | None:
    """The point's evaluation JSON, or None if absent or unreadable."""
    try:
        return json.loads(point.results_path.read_text())
    except (OSError, ValueError):
        return None


def status(point: Point, ev: EvalSpec) -> str:
    """'done' (trained, and evaluated for this config, step and eval settings, or not to be evaluated), 'trained'
    (evaluation missing or stale), 'partial' (a checkpoint short of its steps: resumed), 'changed' (a run of another
    config, or past the spec's steps: never reused under the new config; `changed_reason`) or 'new'."""
    step = checkpoint_step(point.run_dir)
    if step is None:
        return "new"
    if step > point.cfg.train.steps or not _checkpoint_holds(point):
        return "changed"
    if step < point.cfg.train.steps:
        return "partial"
    if not point.evaluate:
        return "done"
    r = read_results(point)
    fresh = (r is not None and r.get("step") == step and r.get("eval") == ev.settings()
             and _same_config(r.get("config"), point.cfg))
    return "done" if fresh else "trained"


def _same_config(stored, cfg: RunConfig) -> bool:
    """A results file's config is `cfg`, compared as configs (`rundir.config_diff`, as train's check): a field added
    to tcmlab since the file was written reads as its default, the speed and bookkeeping options
    (`config.FREE_FIELDS`) may differ, and so may init_from (the sweep's folder named by another path, or moved),
    so finished points stay finished."""
    from .rundir import config_diff

    try:
        old = from_dict(stored)
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
    return not config_diff(old, cfg, init_free=True)


def _checkpoint_diff(point: Point) -> list[str]:
    """How the config of the point's checkpoint differs from the point's (train.steps aside), read from the header
    alone (`rundir.config_diff`); [] if it is the same or cannot be read (training it then reports the damage)."""
    from safetensors import SafetensorError

    from . import checkpoint
    from .model import CKPT_NAME
    from .rundir import config_diff

    try:
        old = from_dict(json.loads(checkpoint.header(Path(point.run_dir) / CKPT_NAME)["config"]))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return []
    cfg = point.cfg
    return config_diff(old, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=old.train.steps)),
                       init_free=True) + _init_from_diff(point)


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    from . import checkpoint

    return checkpoint.sha256(path)


def _init_from_diff(point: Point) -> list[str]:
    """A point of the spec's first stage starts from the spec's init_from (an EDM pickle, an earlier run), which
    `config_diff` does not compare (a run started from its parent in the sweep is named by another path when the
    sweep's folder moves): the file its checkpoint started from (init_source's sha256) must be the file the spec names
    now. If that file is gone, its path must be the one the run recorded. [] for the other points."""
    from . import checkpoint
    from .model import CKPT_NAME, checkpoint_path

    if point.parent is not None or point.cfg.init_from is None:
        return []
    src = checkpoint.init_source(Path(point.run_dir) / CKPT_NAME)  # None if unreadable: training reports that
    if not src:
        return []
    try:
        path = checkpoint_path(point.cfg.init_from)
    except FileNotFoundError:  # gone: compared by path below
        path = Path(point.cfg.init_from)
    was = Path(src.get("resolved") or src["path"]).resolve()
    if path.is_file():
        try:
            st = path.stat()
            now = _file_sha256(str(path.resolve()), st.st_mtime_ns, st.st_size)
        except OSError:  # unreadable: compared by path below
            now = None
        if now == src["sha256"]:
            return []
        if now is not None:
            return [f"init_from: the spec names {path} (not the file this run started from, {was}, sha256 "
                    f"{src['sha256'][:12]}…)"]
    same = was in (path.resolve(), (path / CKPT_NAME).resolve())
    return [] if same else [f"init_from {str(was)!r} -> {str(path)!r} (which does not exist)"]


def _checkpoint_holds(point: Point) -> bool:
    """The point's checkpoint was trained with its config (the spec may have changed since)."""
    return not _checkpoint_diff(point)


def changed_reason(point: Point) -> str:
    """Why a 'changed' point is not trained on: what differs, or that a run cannot be shortened; and what to do."""
    diff = _checkpoint_diff(point)
    if diff:
        return (f"{point.run_dir} holds a run of another config than the spec now gives (differs in: "
                f"{', '.join(diff)}): use a new out for the new spec, or put the old values back")
    return (f"{point.run_dir} is at step {checkpoint_step(point.run_dir)}, past train.steps={point.cfg.train.steps}: "
            f"a run cannot be shortened (give steps >= its step in the spec, or use a new out)")


@dataclass(frozen=True)
class Task:
    """'train' or 'evaluate' one point, after the tasks named in deps."""

    action: str
    point: Point
    deps: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.action} {self.point.id}"


def plan(points: list[Point], ev: EvalSpec) -> tuple[list[Task], dict[str, str]]:
    """The tasks still to do and each point's status. A point is trained after its parent's training task (if that
    is planned) and evaluated after its own; the points `left_out` names get no tasks (their scores would never
    reach the tables)."""
    tasks = []
    states = {p.id: status(p, ev) for p in points}
    gone = left_out(points, states)
    planned = set()
    for p in points:
        s = states[p.id]
        if p.id in gone:
            continue
        if s in ("new", "partial", "changed"):
            deps = (f"train {p.parent}",) if f"train {p.parent}" in planned else ()
            tasks.append(Task("train", p, deps))
            planned.add(tasks[-1].key)
        if s != "done" and p.evaluate:
            deps = (f"train {p.id}",) if f"train {p.id}" in planned else ()
            tasks.append(Task("evaluate", p, deps))
    return tasks, states


# ---------------------------------------------------------------------------------------------------------------------
# Work (runs in a worker process, a submitit job, or inline)


_EVAL_SETS: dict = {}  # per worker process: one EvalSet per data config (features and floors cached inside)


def _eval_set(cfg: RunConfig, ev: EvalSpec, cuda: bool):
    from . import evalsets

    key = (cfg.data, ev.data_root, ev.inception_weights)
    if key not in _EVAL_SETS:
        _EVAL_SETS[key] = evalsets.eval_set(cfg.data, data_root=ev.data_root, inception_weights=ev.inception_weights)
    es = _EVAL_SETS[key]
    es.cuda = cuda
    return es


def _start_control(point: Point) -> None:
    """A control run starts as a copy of its stage-1 run's checkpoint and metrics, each copied under a temporary
    name and then renamed, the checkpoint last: once it is there, the copy is complete."""
    from .model import CKPT_NAME

    dst = Path(point.run_dir)
    if (dst / CKPT_NAME).exists():
        return
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", CKPT_NAME):
        src, tmp = Path(point.parent_dir) / name, dst / f".{name}.copying"
        if src.exists():
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst / name)


def _training_eval(point: Point, ev: EvalSpec, device: str | None):
    """The eval_fn of a stage-1/2 or control run when `[eval] every` is set and its kind is in `[eval] kinds` (the
    tables keep no curves of the others): dFID_t at the final evaluation's t (and t′) plus 1-step FID, from EMA
    weights, at the spec's n and seed."""
    import torch

    from . import metrics
    if not ev.every or point.stage == 0 or not point.evaluate:
        return None
    cfg = point.cfg
    es = _eval_set(cfg, ev, torch.device(device or "cpu").type == "cuda")
    t_prime = cfg.loss.t_prime if cfg.stage == 2 else None
    ts = metrics.dfid_ts_for(cfg.t_max, t_prime)
    shape = tuple(es.to_model(es.query[:1]).shape[1:])
    return metrics.dfid_callback(es, ts, n=ev.n, seed=ev.seed, device=device, one_step=(shape, cfg.t_max, t_prime))


def _train_point(point: Point, ev: EvalSpec, device: str | None) -> dict:
    from .train import NonFiniteError, train

    if point.kind == "control":
        _start_control(point)
    eval_fn = _training_eval(point, ev, device)
    try:
        r = train(point.cfg, point.run_dir, device=device, progress=False, eval_fn=eval_fn,
                  eval_every=ev.every if eval_fn else 0)
    except NonFiniteError as e:  # a sweep trains each run under the spec's config only: no --allow-change here
        if checkpoint_step(point.run_dir) is None:
            raise NonFiniteError(e.what, "No checkpoint was written yet, so nothing is lost: check the data, or "
                                 "lower this stage's train.lr in the spec and run the sweep again.") from None
        fp32 = "" if point.cfg.train.precision == "fp32" else " (or set train.precision = \"fp32\")"
        raise NonFiniteError(e.what, f"The last checkpoint in {point.run_dir} is intact. Check the data, or lower "
                             f"this stage's train.lr{fp32} in the spec and use a new out.") from None
    return {"step": r.step}


def _evaluate_point(point: Point, ev: EvalSpec, device: str | None) -> dict:
    import torch

    from .checkpoint import atomic_write_text
    from .metrics import evaluate_run
    from .model import load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    m = load_model(point.run_dir, device=device)
    es = _eval_set(m.cfg, ev, torch.device(device).type == "cuda")
    rows = evaluate_run(m, es, n=ev.n, seed=ev.seed, t_mid=ev.t_mid, batch=ev.batch, dfid=ev.dfid, device=device,
                        draws=ev.draws)
    out = {"point": point.id, "kind": point.kind, "stage": point.stage, "seed": point.seed,
           "values": dict(point.values), "run_dir": point.run_dir, "step": m.step, "eval": ev.settings(),
           "config": _config_json(point.cfg), "seconds": time.perf_counter() - t0, "rows": rows}
    atomic_write_text(point.results_path, json.dumps(out, indent=1) + "\n")
    return {"step": m.step}


def do_task(task: Task, ev: EvalSpec, device: str | None = None) -> dict:
    """Train or evaluate one point in this process."""
    if task.action == "train":
        return _train_point(task.point, ev, device)
    return _evaluate_point(task.point, ev, device)


def run_task(task: Task, ev: EvalSpec, device: str | None = None, threads: int = 1) -> dict:
    """`do_task` in a worker process or job with `threads` torch threads. Any failure comes back as a RuntimeError
    carrying the message and the traceback as text (some exceptions, e.g. train's Interrupted, cannot be pickled back
    to the sweep process as they are)."""
    try:
        import torch

        torch.set_num_threads(threads)
        return do_task(task, ev, device)
    except BaseException as e:  # noqa: BLE001 - reported to the sweep process as text
        raise RuntimeError(f"{TASK_ERROR}{type(e).__name__}: {e}\n{traceback.format_exc()}") from None


# ---------------------------------------------------------------------------------------------------------------------
# Table, summary, figures

COLUMNS_HEAD = ("point", "kind", "stage", "seed")
COLUMNS_TAIL = ("steps", "metric", "t", "value", "value_sd", "kid_std", "n", "nonfinite", "floor", "floor_n", "card")


def _metric_rows(r: dict) -> list[dict]:
    """Table rows of one evaluation row: fid_Kstep and kid_Kstep (sample quality) or dfid at t."""
    card = r["card"]
    common = {"n": card["n"], "nonfinite": r.get("nonfinite"),  # absent in an evaluation written before it was counted
              "floor_n": r["floor_n"], "card": json.dumps(card, sort_keys=True)}
    draws = r.get("fid_draws", [])  # absent in an evaluation written before draws existed: one draw
    fid = {"value": r["fid"], "value_sd": statistics.stdev(draws) if len(draws) > 1 else None, "floor": r["floor"]}
    if card["metric"] == "dfid":
        return [{"metric": "dfid", "t": card["steps"][0], **fid, **common}]
    sampler = "heun" if card["metric"] == "fid_heun" else f"{len(card['steps'])}step"  # Heun: a stage-0 model
    out = [{"metric": f"fid_{sampler}", **fid, **common}]
    if "kid_mean" in r:
        out.append({"metric": f"kid_{sampler}", "value": r["kid_mean"], "kid_std": r["kid_std"], **common})
    return out


def results_table(points: list[Point], columns: list[str], ev: EvalSpec, leave_out=()) -> list[dict]:
    """One row per point × metric from the points' JSONs; points without a current one (missing, or written for
    another config, step or eval settings), and those named in `leave_out`, are left out."""
    rows = []
    for p in points:
        if not p.evaluate or p.id in leave_out or status(p, ev) != "done":
            continue
        r = read_results(p)
        base = {"point": p.id, "kind": p.kind, "stage": p.stage, "seed": p.seed,
                **{c: v for c, v in p.values}, "steps": r["step"]}
        for er in r["rows"]:
            rows += [{c: {**base, **m}.get(c) for c in (*COLUMNS_HEAD, *columns, *COLUMNS_TAIL)}
                     for m in _metric_rows(er)]
    return rows


def curves_table(points: list[Point], columns: list[str], leave_out=()) -> list[dict]:
    """One row per point × evaluation during training × metric (`[eval] every`): dFID_t at each t and 1-step FID,
    read from the runs' metrics.jsonl (a step logged twice, e.g. across a resume, counts once: the last row).
    A control run's rows begin with the stage-1 rows it continues. Points named in `leave_out` are left out."""
    from .rundir import read_metrics

    rows = []
    for p in points:
        if not p.evaluate or p.stage == 0 or p.id in leave_out:
            continue
        by_step = {r["step"]: r for r in read_metrics(Path(p.run_dir) / "metrics.jsonl") if r.get("kind") == "eval"}
        base = {"point": p.id, "kind": p.kind, "stage": p.stage, "seed": p.seed, **{c: v for c, v in p.values}}
        for step, r in sorted(by_step.items()):
            common = {"step": step, "n": r.get("n"), "floor": r.get("floor")}
            metrics = [("dfid", float(t), v) for t, v in r.get("dfid", {}).items()]
            if "fid_1step" in r:
                metrics.append(("fid_1step", None, r["fid_1step"]))
            rows += [{c: {**base, **common, "metric": m, "t": t, "value": v}.get(c)
                      for c in (*COLUMNS_HEAD, *columns, "step", "metric", "t", "value", "n", "floor")}
                     for m, t, v in metrics]
    return rows


def timing_table(points: list[Point], columns: list[str], leave_out=()) -> list[dict]:
    """One row per trained point: the steps it trained itself (a control: those after the stage-1 run it continues)
    and their median seconds per step, from metrics.jsonl's train rows (the median: a row after a resume also times
    the start). For comparisons at equal wall-clock (stage 2 against the control). Points named in `leave_out` are
    left out."""
    from .rundir import read_metrics

    by_id = {p.id: p for p in points}
    rows = []
    for p in points:
        if p.id in leave_out:
            continue
        start = by_id[p.parent].cfg.train.steps if p.kind == "control" and p.parent in by_id else 0
        train_rows = [r for r in read_metrics(Path(p.run_dir) / "metrics.jsonl")
                      if r.get("kind") == "train" and r["step"] > start]
        if not train_rows:
            continue
        rows.append({"point": p.id, "kind": p.kind, "stage": p.stage, "seed": p.seed, **{c: None for c in columns},
                     **{c: v for c, v in p.values}, "steps_trained": max(r["step"] for r in train_rows) - start,
                     "sec_per_step": statistics.median(r["sec_per_step"] for r in train_rows)})
    return rows


def _to_stale(path: Path) -> Path:
    """Rename path to NAME.stale (NAME.stale.2, .3, … where that is taken: an earlier one is never overwritten)."""
    stale, i = path.with_name(path.name + ".stale"), 1
    while stale.exists():
        i += 1
        stale = path.with_name(f"{path.name}.stale.{i}")
    path.replace(stale)
    return stale


def _set_aside(paths: list[Path], why: str, log) -> None:
    """Tables of an earlier call that this call would drop rows of (the points or eval settings changed, a point
    left out or not evaluated now): renamed (`_to_stale`), so that `claims` and the figures never read them as
    current; nothing is deleted. One line says which."""
    kept = [f"{p.name} as {_to_stale(p).name}" for p in paths if p.exists()]
    if kept:
        log(f"{why}; the earlier table{'s are' if len(kept) > 1 else ' is'} kept: {', '.join(kept)}")


def _write_table(path: Path, rows: list[dict], key: tuple[str, ...], log, derived: tuple[Path, ...] = ()) -> None:
    """Write a table; where it has no rows, or the earlier table there has rows this one lacks (compared by the
    `key` columns), that table and the files `derived` from it are set aside first (`_set_aside`)."""
    new = {tuple("" if r.get(c) is None else str(r[c]) for c in key) for r in rows}
    try:
        lost = [k for k in (tuple(r.get(c) or "" for c in key) for r in read_csv(path)) if k not in new]
    except (OSError, ValueError, csv.Error):  # none yet, or unreadable: nothing to keep
        lost = []
    if lost or not rows:
        why = (f"{path.name}: {len(lost)} row(s) of the earlier table are not in this call's (e.g. {lost[0][0]})"
               if rows else f"{path.name}: no current rows")
        _set_aside([path, *derived], why, log)
    if rows:
        write_csv(path, rows)


def _set_aside_evaluations(points: list[Point], log) -> None:
    """The JSONs of points about to be evaluated again (written for other eval settings, another config or step, or
    unreadable): each renamed beside its point (`_to_stale`) first, so that no earlier score is lost."""
    kept = [_to_stale(p.results_path) for p in points if p.results_path.exists()]
    if kept:
        log(f"{len(kept)} earlier evaluation(s) (other eval settings, config or step) set aside beside their points "
            f"as <point>.json.stale, e.g. {kept[0]}")


def report(spec: SweepSpec, points: list[Point], log: Callable[[str], None], png: bool = True
           ) -> tuple[list[dict], list[dict]]:
    """Rebuild results.csv, summary.csv and the figures from the points' JSONs; return (table, summary)."""
    out = Path(spec.out)
    states = {p.id: status(p, spec.eval) for p in points}
    gone = left_out(points, states)
    # the tables hold the runs of this spec: not those trained with another config (or not finished), nor `gone`
    unfinished = {i for i, st in states.items() if st not in ("done", "trained")}
    table = results_table(points, grid_columns(spec), spec.eval, leave_out=gone)
    summary = summarize(table)
    missing = [p.id for p in points if p.evaluate and p.id not in gone and p.id not in {r["point"] for r in table}]
    if missing:
        log(f"{len(missing)} point(s) not (currently) evaluated, left out of the table: {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else ""))
    if gone:
        log(f"{len(gone)} point(s) left out of the tables as not of this spec's chain (see the warnings above)")
    if not table:
        log("no evaluated points yet: no table written")
        _set_aside([out / name for name in ("results.csv", "summary.csv", "summary.md", "curves.csv", "timing.csv")],
                   "no current rows", log)
        return table, summary
    _write_table(out / "results.csv", table, ("point", "metric", "t"), log, (out / "summary.csv", out / "summary.md"))
    write_csv(out / "summary.csv", summary)
    from .checkpoint import atomic_write_text
    atomic_write_text(out / "summary.md", summary_markdown(summary) + "\n")
    curves = curves_table(points, grid_columns(spec), leave_out=gone.keys() | unfinished)
    _write_table(out / "curves.csv", curves, ("point", "step", "metric", "t"), log)
    timing = timing_table(points, grid_columns(spec), leave_out=gone.keys() | unfinished)
    _write_table(out / "timing.csv", timing, ("point",), log)
    paths, note = figures(summary, out / "figures", png, curves=summarize(curves))
    log(f"table: {out / 'results.csv'} ({len(table)} rows), summary: {out / 'summary.csv'} ({len(summary)} rows), "
        + (f"curves over training: {out / 'curves.csv'} ({len(curves)} rows), " if curves else "")
        + (f"time per step: {out / 'timing.csv'}, " if timing else "")
        + f"figures: {out / 'figures'}")
    if note:
        log(note)
    return table, summary


# ---------------------------------------------------------------------------------------------------------------------
# The sweep


def _write_failures(path: Path, details: dict[str, str], log) -> None:
    """The full text of this call's failures (tracebacks), or no file when nothing failed."""
    if details:
        path.write_text("".join(f"=== {k}\n{v}\n\n" for k, v in details.items()))
        log(f"tracebacks of the failed tasks: {path}")
    else:
        path.unlink(missing_ok=True)


def check_device(device: str | None, here: bool = True) -> None:
    """Refuse, before any task starts, a device torch cannot parse, and where the tasks run on this machine (`here`:
    not on SLURM's nodes) a CUDA device it does not have: every task would fail on it."""
    if device is None:
        return
    import torch

    try:
        d = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r} (--device): {e}; give e.g. cpu, cuda or cuda:1") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if here and d.type == "cuda" and (d.index or 0) >= count:
        have = f"{count} CUDA device(s) (cuda:0 to cuda:{count - 1})" if count else "no CUDA device"
        raise ValueError(f"device {device!r} (--device): this machine has {have}: give --device cpu, or leave "
                         f"--device out (CUDA when present)")


@dataclass
class SweepResult:
    points: list[Point]
    states: dict[str, str]  # status of each point before this call
    failed: dict[str, str]  # task key -> reason
    table: list[dict]
    summary: list[dict]


def run_sweep(spec: SweepSpec, dispatch: Dispatch = Dispatch(), *, dry_run: bool = False, report_only: bool = False,
              png: bool = True, log: Callable[[str], None] = lambda s: print(f"[sweep] {s}", flush=True)
              ) -> SweepResult:
    """Train and evaluate every point not yet done, then rebuild the table (and figures; PNGs if `png`). Failed
    tasks (and those depending on them) are listed in the result; everything else still runs. Where out holds runs
    of another config than the spec gives ('changed'), nothing runs and the tables are left as they are: each
    changed point's train task is failed with what differs, the other tasks as not run."""
    check_device(dispatch.device, here=False)
    points = expand(spec)
    tasks, states = plan(points, spec.eval)
    counts = {s: sum(v == s for v in states.values()) for s in ("done", "trained", "partial", "new", "changed")}
    n_train = sum(t.action == "train" for t in tasks)
    log(f"{spec.path}: {len(points)} points ({len(spec.seeds)} seeds) in {spec.out}: {counts['done']} done, "
        f"{n_train} to train ({counts['partial']} resumed), {len(tasks) - n_train} to evaluate")
    changed = {p.id: changed_reason(p) for p in points if states[p.id] == "changed"}
    for i, why in changed.items():
        log(f"WARNING: {i}: {why}")
    for line in left_out(points, states).values():
        log(f"WARNING: {line}")
    failed, details = {}, {}
    if changed and not dry_run:  # out holds another spec's sweep: nothing runs, its tables stay those of that spec
        if not report_only:
            failed = {f"train {i}": why for i, why in changed.items()}
            failed.update({t.key: f"not run: {spec.out} holds runs of another config (above)" for t in tasks
                           if t.key not in failed})
        log(f"nothing run and tables not rebuilt: {len(changed)} point(s) in {spec.out} were trained with another "
            f"config than this spec gives ({', '.join(list(changed)[:3])}{' ...' if len(changed) > 3 else ''}"
            f"); the tables there stay those of the spec that trained them. Use a new out for this spec")
        return SweepResult(points, states, failed, [], [])
    if tasks and not (dry_run or report_only):
        check_device(dispatch.device, here=dispatch.executor != "slurm")
        Path(spec.out).mkdir(parents=True, exist_ok=True)
        _set_aside_evaluations([t.point for t in tasks if t.action == "evaluate"], log)
        run = dict(ev=spec.eval, device=dispatch.device)
        runner = submitter(dispatch, Path(spec.out) / "submitit", functools.partial(do_task, **run),
                           functools.partial(run_task, **run))
        log(f"executor {dispatch.executor}, at most {dispatch.limit()} tasks at a time")
        try:
            failed = schedule(tasks, runner, dispatch.limit(), log, details)
        finally:
            runner.close()
        _write_failures(Path(spec.out) / "failures.txt", details, log)
    if dry_run:
        for p in points:
            log(f"  {states[p.id]:8s} {p.id}  ({p.kind}, {p.cfg.train.steps} steps)")
        return SweepResult(points, states, failed, [], [])
    table, summary = report(spec, points, log, png)
    return SweepResult(points, states, failed, table, summary)
