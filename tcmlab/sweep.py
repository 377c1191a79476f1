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
    grid = { "loss.t_prime" = [0.5, 1.0], "loss.w_b" = [0, 0.1] }
    [eval]                             # EvalSpec: n, t_mid, seed, batch, dfid, kinds, data_root, inception_weights
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
steps of the checkpoint), metric (fid_1step, fid_2step, kid_1step, kid_2step, dfid), t (dFID's noise level), value,
kid_std (KID's spread over subsets), n, floor (real-vs-real FD at floor_n; None for KID and for CIFAR-10), floor_n,
card (the eval card, JSON); `<out>/summary.csv` (`summarize`: mean, std, count over seeds per grid point and metric)
and `<out>/summary.md` (its sample-quality rows as a markdown table); `<out>/figures/` (FID and dFID_t, mean ± std
over seeds); `<out>/failures.txt` (the tracebacks of this call's failed tasks, if any).

Resuming: a point whose checkpoint is at its target step and whose JSON matches its config and the eval settings
is skipped; a partial run resumes from its checkpoint (`train` does that); a trained run without a current JSON is
only evaluated. Runs that need it train on worker processes (one torch thread each; `--workers`), on submitit's
local executor, or on SLURM (`--executor slurm`); a task starts once the tasks it depends on have finished.
Ctrl-C or SIGTERM stops the running trainings after a checkpoint (the same command resumes them). A changed spec
value that changes a finished run's config makes that point fail with "holds a different run" (train's check):
use a new `out`. Only train.steps may grow: extending stage 1 does not mark its stage-2 runs stale.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import time
import tomllib
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import PRESETS, RunConfig, preset, to_dict

KINDS = ("stage0", "stage1", "stage2", "control")
EXECUTORS = ("processes", "submitit-local", "slurm", "inline")
SECTIONS = ("data", "net", "train", "loss")
TOP_FIELDS = ("name", "init_from", "from_scratch")
SPEC_KEYS = ("preset", "seeds", "out", "stages", "control", "stage0", "stage1", "stage2", "eval")
STAGE_KEYS = ("steps", "set", "grid")


TASK_ERROR = "[tcmlab task] "  # marks the reason line in a failed task's text (a submitit traceback holds it)


class SpecError(ValueError):
    """A sweep spec that cannot be used; the message names the file, the table and the field."""


# ---------------------------------------------------------------------------------------------------------------------
# The spec


@dataclass(frozen=True)
class StageSpec:
    """One stage of the sweep: train.steps (None = the preset's), fixed overrides, and a grid (field -> values)."""

    steps: int | None = None
    set: tuple[tuple[str, Any], ...] = ()
    grid: tuple[tuple[str, tuple], ...] = ()


@dataclass(frozen=True)
class EvalSpec:
    """Evaluation of each finished point (`evaluate_run`). n: images per score (None = the whole query set);
    kinds: which point kinds are evaluated."""

    n: int | None = None
    t_mid: float = 1.0
    seed: int = 0
    batch: int = 1024
    dfid: bool = True
    kinds: tuple[str, ...] = ("stage1", "stage2", "control")
    data_root: str | None = None
    inception_weights: str | None = None

    def settings(self) -> dict:
        """What a stored evaluation depends on: a JSON written under other settings is computed again."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "kinds"}


@dataclass(frozen=True)
class SweepSpec:
    path: str
    preset: str
    seeds: tuple[int, ...]
    out: str
    stages: tuple[tuple[int, StageSpec], ...]
    control: bool = False
    eval: EvalSpec = field(default_factory=EvalSpec)

    def stage(self, k: int) -> StageSpec:
        return dict(self.stages)[k]


def _flatten(table: dict, prefix: str = "") -> dict:
    """TOML `{loss.t_prime = 1}` is nested ({'loss': {'t_prime': 1}}); config keys are dotted 'loss.t_prime'."""
    out = {}
    for k, v in table.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_keys(where: str, table, allowed) -> dict:
    if not isinstance(table, dict):
        raise SpecError(f"{where} must be a table, got {table!r}")
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(allowed)}")
    return table


def _typed(where: str, value, kind, rule: str, ok: Callable = lambda v: True):
    """value if it has type `kind` (bool is not an int here) and passes `ok`, else a SpecError naming `where`."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds) or not ok(value):
        raise SpecError(f"{where} must be {rule}, got {value!r}")
    return value


def _int_list(where: str, value, rule: str, ok=lambda v: True) -> tuple[int, ...]:
    _typed(where, value, list, f"a list of {rule}", lambda v: len(v) > 0)
    items = tuple(_typed(where, v, int, rule, ok) for v in value)
    if len(set(items)) != len(items):
        raise SpecError(f"{where} lists a value twice: {list(value)}")
    return items


def _coerce(where: str, value, current):
    """A spec value in the type of the config field it sets (TOML int -> float fields, list -> tuple fields)."""
    if isinstance(current, bool):
        return _typed(where, value, bool, "true or false")
    if isinstance(current, int):
        return _typed(where, value, int, f"an integer (like {current!r})")
    if isinstance(current, float):
        return float(_typed(where, value, (int, float), f"a number (like {current!r})"))
    if isinstance(current, tuple):
        _typed(where, value, list, f"a list (like {list(current)!r})")
        return tuple(_coerce(where, v, current[0] if current else 0.0) for v in value)
    return _typed(where, value, str, f"a string (like {current!r})")


def _field_value(cfg: RunConfig, key: str):
    """The current value of `key` ('section.field' or a top-level field) in cfg; KeyError if there is no such field."""
    if key in TOP_FIELDS:
        return getattr(cfg, key)
    section, _, name = key.partition(".")
    if section not in SECTIONS or name not in {f.name for f in dataclasses.fields(getattr(cfg, section))}:
        raise KeyError(key)
    return getattr(getattr(cfg, section), name)


def _field_names(cfg: RunConfig, key: str) -> str:
    section = key.partition(".")[0]
    if section in SECTIONS:
        return ", ".join(f"{section}.{f.name}" for f in dataclasses.fields(getattr(cfg, section)))
    return ", ".join(TOP_FIELDS + tuple(f"{s}.<field>" for s in SECTIONS))


def _check_field(where: str, cfg: RunConfig, key: str, value, first_stage: bool):
    """Validate one spec field against the stage's config: it exists, is not set by the sweep, has the right type."""
    reserved = {"train.seed": "list seeds in `seeds = [...]`",
                "train.steps": "give the stage's step count as `steps = N` in its table"}
    if key in reserved:
        raise SpecError(f"{where}: {key} is set by the sweep: {reserved[key]}")
    if key == "init_from" and not first_stage:
        raise SpecError(f"{where}: init_from is set by the sweep (stage {cfg.stage} starts from its stage-"
                        f"{cfg.stage - 1} run); set it only in the first stage of `stages`")
    try:
        current = _field_value(cfg, key)
    except KeyError:
        raise SpecError(f"{where}: {key!r} is not a field of the stage-{cfg.stage} config "
                        f"({type(cfg.loss).__name__}); fields: {_field_names(cfg, key)}") from None
    if key == "init_from":
        return _typed(where, value, str, "a path (string)")
    return _coerce(where, value, current)


def _stage_spec(path: str, preset_name: str, k: int, table: dict, first: bool) -> StageSpec:
    """Parse `[stageK]`: steps, set (fixed overrides), grid (field -> non-empty list of distinct values)."""
    where = f"{path}: [stage{k}]"
    _check_keys(where, table, STAGE_KEYS)
    base = preset(preset_name, k)
    steps = table.get("steps")
    if steps is not None:
        _typed(f"{where} steps", steps, int, "an integer >= 1", lambda v: v >= 1)
    fixed = _flatten(_typed(f"{where} set", table.get("set", {}), dict, 'a table like { "train.lr" = 1e-3 }'))
    grid = _flatten(_typed(f"{where} grid", table.get("grid", {}), dict, 'a table like { "loss.t_prime" = [0.5, 1] }'))
    sets = tuple((key, _check_field(f"{where} set {key}", base, key, v, first)) for key, v in fixed.items())
    axes = []
    for key, values in grid.items():
        w = f"{where} grid {key}"
        _typed(w, values, list, "a non-empty list of values", lambda v: len(v) > 0)
        vals = tuple(_check_field(w, base, key, v, first) for v in values)
        if len(set(vals)) != len(vals):
            raise SpecError(f"{w} lists a value twice: {list(values)}")
        if key in fixed:
            raise SpecError(f"{w}: {key} is both in `set` and in `grid`; keep one")
        axes.append((key, vals))
    return StageSpec(steps, sets, tuple(axes))


def _eval_spec(path: str, table: dict) -> EvalSpec:
    where = f"{path}: [eval]"
    _check_keys(where, table, [f.name for f in dataclasses.fields(EvalSpec)])
    kw = dict(table)
    if "n" in kw:
        _typed(f"{where} n", kw["n"], int, "an integer >= 2 (images per score)", lambda v: v >= 2)
    if "t_mid" in kw:
        kw["t_mid"] = float(_typed(f"{where} t_mid", kw["t_mid"], (int, float), "a number > 0", lambda v: v > 0))
    if "seed" in kw:
        _typed(f"{where} seed", kw["seed"], int, "an integer")
    if "batch" in kw:
        _typed(f"{where} batch", kw["batch"], int, "an integer >= 1", lambda v: v >= 1)
    if "dfid" in kw:
        _typed(f"{where} dfid", kw["dfid"], bool, "true or false")
    if "kinds" in kw:
        _typed(f"{where} kinds", kw["kinds"], list, f"a list of {', '.join(KINDS)}",
               lambda v: all(x in KINDS for x in v))
        kw["kinds"] = tuple(kw["kinds"])
    for key in ("data_root", "inception_weights"):
        if key in kw:
            _typed(f"{where} {key}", kw[key], str, "a path (string)")
    return EvalSpec(**kw)


def load_spec(path: str | Path, out: str | Path | None = None) -> SweepSpec:
    """Read and check a sweep spec (TOML); every point's config is built once here, so a bad value fails before any
    training. `out` replaces the spec's output folder."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"sweep spec {path} does not exist: give the path of a TOML file like sweeps/ci.toml")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"sweep spec {path} is not valid TOML ({e}); see sweeps/ci.toml for the format") from None
    spec = parse_spec(raw, str(path), out)
    expand(spec)
    return spec


def parse_spec(raw: dict, path: str = "<spec>", out: str | Path | None = None) -> SweepSpec:
    """A SweepSpec from the parsed TOML table (see the module docstring for the keys)."""
    _check_keys(path, raw, SPEC_KEYS)
    if "preset" not in raw:
        raise SpecError(f"{path}: missing key 'preset' (one of {', '.join(PRESETS)})")
    name = _typed(f"{path}: preset", raw["preset"], str, f"one of {', '.join(PRESETS)}", lambda v: v in PRESETS)
    available = [k for k in (0, 1, 2) if PRESETS[name][k] is not None]
    stages = _int_list(f"{path}: stages", raw.get("stages", available), "stage numbers 0, 1, 2")
    if list(stages) != list(range(stages[0], stages[0] + len(stages))) or any(k not in available for k in stages):
        raise SpecError(f"{path}: stages must be consecutive stages of preset {name!r} (available: {available}), "
                        f"got {list(stages)}")
    for k in (0, 1, 2):
        if f"stage{k}" in raw and k not in stages:
            raise SpecError(f"{path}: [stage{k}] is given but stage {k} is not in stages = {list(stages)}")
    control = _typed(f"{path}: control", raw.get("control", False), bool, "true or false")
    if control and not {1, 2} <= set(stages):
        raise SpecError(f"{path}: control = true needs stages 1 and 2 (it continues stage 1 for stage 2's steps)")
    seeds = _int_list(f"{path}: seeds", raw.get("seeds", [0]), "integers >= 0", lambda v: v >= 0)
    out = str(out) if out is not None else _typed(f"{path}: out", raw.get("out", f"runs/sweeps/{Path(path).stem}"),
                                                  str, "a folder path (string)")
    return SweepSpec(path, name, seeds, out,
                     tuple((k, _stage_spec(path, name, k, raw.get(f"stage{k}", {}), k == stages[0])) for k in stages),
                     control, _eval_spec(path, raw.get("eval", {})))


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
    keys = [key for _, st in spec.stages for key, _ in st.grid]
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
                for combo in itertools.product(*[[(key, v) for v in vals] for key, vals in st.grid]):
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
    return points


def grid_columns(spec: SweepSpec) -> list[str]:
    """The table's grid columns, 's<stage>.<field>', in spec order."""
    return [f"s{k}.{key}" for k, st in spec.stages for key, _ in st.grid]


# ---------------------------------------------------------------------------------------------------------------------
# Status and plan


def checkpoint_step(run_dir: str | Path) -> int | None:
    """The step of a run directory's checkpoint from its header alone (no tensors read); None if there is none,
    0 if it cannot be read (training it then reports the damage with what to do)."""
    from safetensors import safe_open

    from .model import CKPT_NAME

    path = Path(run_dir) / CKPT_NAME
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            skeleton = json.loads((fh.metadata() or {})["tcmlab"])
        return int(dict(skeleton["__dict__"])["step"])
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
    (evaluation missing or stale), 'partial' (a checkpoint short of its steps: resumed) or 'new'."""
    step = checkpoint_step(point.run_dir)
    if step is None:
        return "new"
    if step < point.cfg.train.steps:
        return "partial"
    if not point.evaluate:
        return "done"
    r = read_results(point)
    fresh = (r is not None and r.get("step") == step and r.get("eval") == ev.settings()
             and r.get("config") == _config_json(point.cfg))
    return "done" if fresh else "trained"


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
    is planned) and evaluated after its own."""
    tasks, states = [], {}
    planned = set()
    for p in points:
        states[p.id] = s = status(p, ev)
        if s in ("new", "partial"):
            deps = (f"train {p.parent}",) if f"train {p.parent}" in planned else ()
            tasks.append(Task("train", p, deps))
            planned.add(tasks[-1].key)
        if s != "done" and p.evaluate:
            deps = (f"train {p.id}",) if f"train {p.id}" in planned else ()
            tasks.append(Task("evaluate", p, deps))
    return tasks, states


# ---------------------------------------------------------------------------------------------------------------------
# Work (runs in a worker process, a submitit job, or inline)


def evaluate_run(m, es, *, n: int | None = None, seed: int = 0, t_mid: float = 1.0, batch: int = 1024,
                 dfid: bool = True, device=None, progress: bool = False) -> list[dict]:
    """Rows with eval cards for a `TrainedModel`: 1- and 2-step FID/KID (`metrics.sample_quality`), then dFID_t at
    `metrics.dfid_ts(T)` and, for a stage-2 model, at t′; each row with the real-vs-real floor at its n."""
    import torch

    from . import metrics

    d = {}
    if dfid:
        g = torch.Generator().manual_seed(seed)
        ts = sorted(set(metrics.dfid_ts(m.t_max)) | ({m.t_prime} if m.t_prime else set()))
        d = metrics.dfid(m.f, es, ts, n=n, generator=g, batch=batch, device=device, progress=progress)
    rows = metrics.sample_quality(m, es, t_mid=t_mid, n=n, seed=seed, batch=batch, device=device)
    n_q = metrics.floor_n(es, n)
    fl = metrics.floor(es, n_q) if es.disjoint else None  # CIFAR-10's train-vs-train protocol has no floor
    rows += [{"card": dataclasses.asdict(metrics.dfid_card(es, t, n_q, m.which, seed, m.step)), "fid": v,
              "floor": fl, "floor_n": n_q} for t, v in d.items()]
    return rows


_EVAL_SETS: dict = {}  # per worker process: one EvalSet per data config (features and floors cached inside)


def _eval_set(cfg: RunConfig, ev: EvalSpec, cuda: bool):
    from . import metrics

    key = (cfg.data, ev.data_root, ev.inception_weights)
    if key not in _EVAL_SETS:
        _EVAL_SETS[key] = metrics.eval_set(cfg.data, data_root=ev.data_root, inception_weights=ev.inception_weights)
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


def _train_point(point: Point, device: str | None) -> dict:
    from .train import train

    if point.kind == "control":
        _start_control(point)
    r = train(point.cfg, point.run_dir, device=device, progress=False)
    return {"step": r.step}


def _evaluate_point(point: Point, ev: EvalSpec, device: str | None) -> dict:
    import torch

    from .checkpoint import atomic_write_text
    from .model import load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    m = load_model(point.run_dir, device=device)
    es = _eval_set(m.cfg, ev, torch.device(device).type == "cuda")
    rows = evaluate_run(m, es, n=ev.n, seed=ev.seed, t_mid=ev.t_mid, batch=ev.batch, dfid=ev.dfid, device=device)
    out = {"point": point.id, "kind": point.kind, "stage": point.stage, "seed": point.seed,
           "values": dict(point.values), "run_dir": point.run_dir, "step": m.step, "eval": ev.settings(),
           "config": _config_json(point.cfg), "seconds": time.perf_counter() - t0, "rows": rows}
    atomic_write_text(point.results_path, json.dumps(out, indent=1) + "\n")
    return {"step": m.step}


def do_task(task: Task, ev: EvalSpec, device: str | None = None) -> dict:
    """Train or evaluate one point in this process."""
    if task.action == "train":
        return _train_point(task.point, device)
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
# Dispatch


class _Done:
    """A finished 'future' for inline execution (Ctrl-C is not caught: it stops the sweep)."""

    def __init__(self, fn, *args):
        try:
            self.value, self.error = fn(*args), None
        except Exception as e:
            self.value, self.error = None, e

    def done(self) -> bool:
        return True

    def result(self):
        if self.error is not None:
            raise self.error
        return self.value


@dataclass(frozen=True)
class Dispatch:
    """Where tasks run. executor: 'processes' (a spawn pool on this machine, one torch thread per worker),
    'submitit-local' (submitit's LocalExecutor, one process per task), 'slurm' (submitit's SLURM executor),
    'inline' (this process, one task at a time). workers: tasks in flight at most (None: the CPU count; SLURM: no
    limit). The SLURM fields go to submitit.AutoExecutor.update_parameters."""

    executor: str = "processes"
    workers: int | None = None
    device: str | None = None
    partition: str | None = None
    time_min: int = 60
    gpus: int = 0
    cpus: int = 1
    mem_gb: int | None = None

    def limit(self) -> int:
        if self.workers:
            return self.workers
        return 10 ** 6 if self.executor == "slurm" else (os.cpu_count() or 1)


@dataclass(frozen=True)
class _Submitter:
    """How a dispatch kind runs tasks: submit(task) -> a handle with done()/result(); interrupt(handles) asks the
    running tasks to stop (training checkpoints first); close() waits for the workers; poll_s between polls."""

    submit: Callable
    interrupt: Callable = lambda handles: None
    close: Callable = lambda: None
    poll_s: float = 0.0


def _worker_init() -> None:
    """Pool workers ignore Ctrl-C except while training (train() installs its own handler, which checkpoints and
    stops): an interrupted sweep stops its runs cleanly instead of breaking the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def submitit_executor(d: Dispatch, folder: Path):
    """submitit.AutoExecutor for 'slurm' (SLURM through sbatch; needs srun on PATH) or 'submitit-local', with the
    dispatch's time limit, GPUs, CPUs, memory and partition; job files and logs go to `folder/<job id>/`."""
    import submitit

    if d.executor == "slurm" and shutil.which("srun") is None:
        raise RuntimeError("--executor slurm: no SLURM here (srun is not on PATH). Run the sweep on a SLURM login "
                           "node, or use --executor processes on this machine")
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm" if d.executor == "slurm" else "local")
    ex.update_parameters(timeout_min=d.time_min, gpus_per_node=d.gpus, cpus_per_task=d.cpus, mem_gb=d.mem_gb,
                         name="tcmlab-sweep", slurm_partition=d.partition)
    return ex


def _submitter(d: Dispatch, ev: EvalSpec, folder: Path) -> _Submitter:
    if d.executor == "inline":
        return _Submitter(lambda t: _Done(do_task, t, ev, d.device))
    if d.executor == "processes":
        pool = concurrent.futures.ProcessPoolExecutor(d.limit(), mp_context=multiprocessing.get_context("spawn"),
                                                      initializer=_worker_init)

        def interrupt(handles):
            for proc in list((getattr(pool, "_processes", None) or {}).values()):  # the pool's worker processes
                if proc.is_alive():
                    os.kill(proc.pid, signal.SIGINT)

        return _Submitter(lambda t: pool.submit(run_task, t, ev, d.device, 1), interrupt,
                          lambda: pool.shutdown(wait=True, cancel_futures=True), 0.2)
    ex = submitit_executor(d, folder)

    def cancel(handles):  # scancel: SIGTERM, then train() checkpoints; local jobs get SIGINT
        for job in handles:
            job.cancel(check=False)

    return _Submitter(lambda t: ex.submit(run_task, t, ev, d.device, d.cpus), cancel, lambda: None,
                      5.0 if d.executor == "slurm" else 0.5)


def _one_line(e: BaseException) -> str:
    """The reason of a failure in one line: the line `run_task` marked, else the last line of the message."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    marked = [line.partition(TASK_ERROR)[2] for line in lines if TASK_ERROR in line]
    return marked[0] if marked else (lines[-1] if lines else type(e).__name__)


def schedule(tasks: list[Task], runner: _Submitter, limit: int, log: Callable[[str], None],
             details: dict[str, str] | None = None) -> dict[str, str]:
    """Run tasks as their dependencies finish, at most `limit` at a time, training before evaluation; return the
    failed (or skipped because a dependency failed) task keys with a one-line reason; `details` receives the full
    text (traceback) of each failure. On KeyboardInterrupt (Ctrl-C, or SIGTERM through the CLI) the running tasks
    are asked to stop and the interrupt is raised again."""
    running: dict = {}
    try:
        return _schedule(tasks, runner, limit, log, details, running)
    except KeyboardInterrupt:
        log(f"interrupted: stopping {len(running)} running task(s) (training writes a checkpoint first)")
        runner.interrupt([h for h, _ in running.values()])
        raise


def _schedule(tasks, runner, limit, log, details, running) -> dict[str, str]:
    pending = {t.key: t for t in tasks}
    done, failed = set(), {}
    while pending or running:
        for key, t in list(pending.items()):
            bad = next((d for d in t.deps if d in failed), None)
            if bad:
                failed[key] = f"not run: {bad} failed"
                del pending[key]
        ready = sorted((t for t in pending.values() if all(d in done for d in t.deps)),
                       key=lambda t: t.action != "train")
        for t in ready[: max(0, limit - len(running))]:
            running[t.key] = (runner.submit(t), time.perf_counter())
            del pending[t.key]
        if pending and not running and not ready:
            raise RuntimeError(f"sweep tasks wait on tasks that are not planned: {sorted(pending)[:3]}")
        finished = [k for k, (h, _) in running.items() if h.done()]
        if not finished:
            time.sleep(runner.poll_s)
            continue
        for key in finished:
            h, t0 = running.pop(key)
            try:
                h.result()
                done.add(key)
                log(f"{key}: done in {time.perf_counter() - t0:.1f} s")
            except Exception as e:
                failed[key] = _one_line(e)
                if details is not None:
                    details[key] = str(e)
                log(f"{key}: FAILED: {failed[key]}")
    return failed


# ---------------------------------------------------------------------------------------------------------------------
# Table, summary, figures

COLUMNS_HEAD = ("point", "kind", "stage", "seed")
COLUMNS_TAIL = ("steps", "metric", "t", "value", "kid_std", "n", "floor", "floor_n", "card")


def _metric_rows(r: dict) -> list[dict]:
    """Table rows of one evaluation row: fid_Kstep and kid_Kstep (sample quality) or dfid at t."""
    card = r["card"]
    common = {"n": card["n"], "floor_n": r["floor_n"], "card": json.dumps(card, sort_keys=True)}
    if card["metric"] == "dfid":
        return [{"metric": "dfid", "t": card["steps"][0], "value": r["fid"], "floor": r["floor"], **common}]
    k = len(card["steps"])
    out = [{"metric": f"fid_{k}step", "value": r["fid"], "floor": r["floor"], **common}]
    if "kid_mean" in r:
        out.append({"metric": f"kid_{k}step", "value": r["kid_mean"], "kid_std": r["kid_std"], **common})
    return out


def results_table(points: list[Point], columns: list[str], ev: EvalSpec) -> list[dict]:
    """One row per point × metric from the points' JSONs; points without a current one (missing, or written for
    another config, step or eval settings) are left out."""
    rows = []
    for p in points:
        if not p.evaluate or status(p, ev) != "done":
            continue
        r = read_results(p)
        base = {"point": p.id, "kind": p.kind, "stage": p.stage, "seed": p.seed,
                **{c: v for c, v in p.values}, "steps": r["step"]}
        for er in r["rows"]:
            rows += [{c: {**base, **m}.get(c) for c in (*COLUMNS_HEAD, *columns, *COLUMNS_TAIL)}
                     for m in _metric_rows(er)]
    return rows


def _number(v) -> float | None:
    return None if v in (None, "") else float(v)


def summarize(table: list[dict]) -> list[dict]:
    """Group the table's rows by grid point (every column except point, seed, value, kid_std, floor, floor_n, card)
    and give mean, std (sample standard deviation over seeds; None for one seed), count and the mean floor. Works on
    `results_table` rows and on rows read back from results.csv (strings)."""
    skip = {"point", "seed", "value", "kid_std", "floor", "floor_n", "card"}
    groups: dict[tuple, list[dict]] = {}
    for row in table:
        groups.setdefault(tuple((c, row[c]) for c in row if c not in skip), []).append(row)
    out = []
    for key, rows in groups.items():
        vals = [_number(r["value"]) for r in rows]
        floors = [f for f in (_number(r.get("floor")) for r in rows) if f is not None]
        out.append({**dict(key), "mean": statistics.fmean(vals),
                    "std": statistics.stdev(vals) if len(vals) > 1 else None, "count": len(vals),
                    "floor": statistics.fmean(floors) if floors else None})
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    """rows as CSV (None -> empty cell), written atomically."""
    from .checkpoint import atomic_write_text

    buf = io.StringIO()
    columns = list(dict.fromkeys(c for r in rows for c in r))
    w = csv.DictWriter(buf, columns, lineterminator="\n")
    w.writeheader()
    w.writerows({c: ("" if r.get(c) is None else r.get(c)) for c in columns} for r in rows)
    atomic_write_text(path, buf.getvalue())


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _label(row: dict) -> str:
    values = [f"{c.rpartition('.')[2]}={row[c]}" for c in row if c[:2] in ("s0", "s1", "s2") and "." in c
              and row[c] not in (None, "")]
    return " ".join([row["kind"], *values])


def summary_figures(summary: list[dict]) -> dict[str, Any]:
    """Two plotly figures of the summary (mean ± std over seeds): 'fid', 1- and 2-step FID per point with the
    real-vs-real floor, and 'dfid', the dFID_t curves."""
    import plotly.graph_objects as go

    fid = go.Figure()
    for metric in ("fid_1step", "fid_2step"):
        rows = [r for r in summary if r["metric"] == metric]
        fid.add_scatter(x=[_label(r) for r in rows], y=[r["mean"] for r in rows], mode="markers", name=metric,
                        error_y=dict(array=[r["std"] or 0 for r in rows]))
    dfid = go.Figure()
    for label, rows in itertools.groupby(sorted((r for r in summary if r["metric"] == "dfid"), key=_label), _label):
        rows = sorted(rows, key=lambda r: float(r["t"]))
        dfid.add_scatter(x=[float(r["t"]) for r in rows], y=[r["mean"] for r in rows], name=label,
                         error_y=dict(array=[r["std"] or 0 for r in rows]))
    floors = [r["floor"] for r in summary if r["metric"] in ("fid_1step", "dfid") and r["floor"] is not None]
    if floors:  # a dotted line (a trace, not add_hline, whose annotation breaks log axes)
        for fig in (fid, dfid):
            x = [d for tr in fig.data for d in tr.x]
            if not x:
                continue
            x = [x[0], x[-1]] if fig is fid else [min(x), max(x)]
            fig.add_scatter(x=x, y=[statistics.fmean(floors)] * 2, mode="lines", line_dash="dot",
                            name="real-vs-real floor")
    fid.update_layout(title="FID (mean ± std over seeds)", yaxis_type="log", height=450,
                      xaxis_title="sweep point (kind and grid values)", yaxis_title="FID (log scale)")
    dfid.update_layout(title="dFID_t (mean ± std over seeds)", xaxis_type="log", yaxis_type="log", height=450,
                       xaxis_title="noise level t (log scale)", yaxis_title="dFID_t (log scale)")
    return {"fid": fid, "dfid": dfid}


def figures(summary: list[dict], folder: Path, png: bool = True) -> tuple[list[Path], str | None]:
    """`summary_figures` written as .json and .html always, as .png when asked and kaleido can render (else the
    reason is returned)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, png_note = [], None if png else "PNG figures not asked for"
    for name, fig in summary_figures(summary).items():
        fig.write_json(folder / f"{name}.json")
        fig.write_html(folder / f"{name}.html", include_plotlyjs="directory")
        paths += [folder / f"{name}.json", folder / f"{name}.html"]
        if png_note is None:
            try:
                fig.write_image(folder / f"{name}.png")
                paths.append(folder / f"{name}.png")
            except Exception as e:  # kaleido needs a Chromium; without one the PNGs are skipped, not the sweep
                png_note = f"PNG figures skipped: kaleido could not render ({_one_line(e)})"
    return paths, png_note


def summary_markdown(summary: list[dict], metrics=("fid_1step", "fid_2step", "kid_1step")) -> str:
    """The summary's sample-quality rows as a markdown table: point, metric, mean ± std over seeds (count), floor."""
    lines = ["| point | metric | mean ± std | seeds | real-vs-real floor |", "|---|---|---|---|---|"]
    for r in sorted((r for r in summary if r["metric"] in metrics), key=lambda r: (r["metric"], _label(r))):
        std = "" if r["std"] in (None, "") else f" ± {float(r['std']):.4g}"
        floor = "" if r["floor"] in (None, "") else f"{float(r['floor']):.4g}"
        lines.append(f"| {_label(r)} | {r['metric']} | {float(r['mean']):.4g}{std} | {r['count']} | {floor} |")
    return "\n".join(lines)


def report(spec: SweepSpec, points: list[Point], log: Callable[[str], None], png: bool = True
           ) -> tuple[list[dict], list[dict]]:
    """Rebuild results.csv, summary.csv and the figures from the points' JSONs; return (table, summary)."""
    out = Path(spec.out)
    table = results_table(points, grid_columns(spec), spec.eval)
    summary = summarize(table)
    missing = [p.id for p in points if p.evaluate and p.id not in {r["point"] for r in table}]
    if missing:
        log(f"{len(missing)} point(s) not (currently) evaluated, left out of the table: {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else ""))
    if not table:
        log("no evaluated points yet: no table written")
        return table, summary
    write_csv(out / "results.csv", table)
    write_csv(out / "summary.csv", summary)
    from .checkpoint import atomic_write_text
    atomic_write_text(out / "summary.md", summary_markdown(summary) + "\n")
    paths, note = figures(summary, out / "figures", png)
    log(f"table: {out / 'results.csv'} ({len(table)} rows), summary: {out / 'summary.csv'} ({len(summary)} rows), "
        f"figures: {out / 'figures'}")
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
    tasks (and those depending on them) are listed in the result; everything else still runs."""
    points = expand(spec)
    tasks, states = plan(points, spec.eval)
    counts = {s: sum(v == s for v in states.values()) for s in ("done", "trained", "partial", "new")}
    n_train = sum(t.action == "train" for t in tasks)
    log(f"{spec.path}: {len(points)} points ({len(spec.seeds)} seeds) in {spec.out}: {counts['done']} done, "
        f"{n_train} to train ({counts['partial']} resumed), {len(tasks) - n_train} to evaluate")
    failed, details = {}, {}
    if tasks and not (dry_run or report_only):
        Path(spec.out).mkdir(parents=True, exist_ok=True)
        runner = _submitter(dispatch, spec.eval, Path(spec.out) / "submitit")
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
