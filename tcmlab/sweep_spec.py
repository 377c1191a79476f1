"""A sweep's spec (TOML, format in `tcmlab.sweep`): parsed and checked into frozen dataclasses before anything runs.

Every point's config is built while the spec is read, so a bad value fails with the file, the table and the field.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import PRESETS, RunConfig, preset

KINDS = ("stage0", "stage1", "stage2", "control")
SECTIONS = ("data", "net", "train", "loss")
TOP_FIELDS = ("name", "init_from", "from_scratch")
SPEC_KEYS = ("preset", "seeds", "out", "stages", "control", "stage0", "stage1", "stage2", "eval")
STAGE_KEYS = ("steps", "set", "grid")


class SpecError(ValueError):
    """A sweep spec that cannot be used; the message names the file, the table and the field."""



@dataclass(frozen=True)
class StageSpec:
    """One stage of the sweep: train.steps (None = the preset's), fixed overrides, and its grid.

    grid: the grid's fields and the values each takes (key, values). combos: the grid points, each a full
    assignment of every grid field ((key, value), ...). A `grid` table is the product of its lists; a list of tables
    (a one-at-a-time ablation) is the union of their products, each completed with the stage's default value of the
    fields its table leaves out, duplicates dropped."""

    steps: int | None = None
    set: tuple[tuple[str, Any], ...] = ()
    grid: tuple[tuple[str, tuple], ...] = ()
    combos: tuple[tuple[tuple[str, Any], ...], ...] = ((),)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(key for key, _ in self.grid)


@dataclass(frozen=True)
class EvalSpec:
    """Evaluation of each finished point (`metrics.evaluate_run`). n: images per score (None = the whole query set);
    kinds: which point kinds are evaluated. every: steps between evaluations during training of the stage-1, stage-2
    and control runs (dFID_t at the final evaluation's t and 1-step FID, logged to metrics.jsonl; the sweep's
    curves.csv and figures over training, TCM Fig. 2 and 3); 0 = none. draws: noise draws per final score (seeds
    seed, seed + 1, …; the score is their mean FID, `metrics.mean_over_draws`); evaluations during training use one."""

    n: int | None = None
    t_mid: float = 1.0
    seed: int = 0
    batch: int = 1024
    dfid: bool = True
    kinds: tuple[str, ...] = ("stage1", "stage2", "control")
    data_root: str | None = None
    inception_weights: str | None = None
    every: int = 0
    draws: int = 1

    def settings(self) -> dict:
        """What a stored evaluation depends on: a JSON written under other settings is computed again (one draw is
        left out, so an evaluation stored before draws existed stays current)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("kinds", "every") and not (k == "draws" and v == 1)}


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
    """TOML `{loss.t_prime = 1}` is nested ({'loss': {'t_prime': 1}}); config keys are dotted 'loss.t_prime'. A key
    given twice (quoted `"loss.t_prime"` beside a nested `loss.t_prime`: valid TOML) is refused, never one dropped."""
    out = {}
    for k, v in table.items():
        for key, value in (_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}).items():
            if key in out:
                raise SpecError(f"{key} is given twice (once quoted, once as a dotted key?): keep one")
            out[key] = value
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


def _grid_axes(where: str, base: RunConfig, grid: dict, fixed: dict, first: bool) -> list[tuple[str, tuple]]:
    """The (key, values) axes of one grid table, each value checked against the stage's config."""
    axes = []
    for key, values in _flatten(grid).items():
        w = f"{where} {key}"
        _typed(w, values, list, "a non-empty list of values", lambda v: len(v) > 0)
        vals = tuple(_check_field(w, base, key, v, first) for v in values)
        if len(set(vals)) != len(vals):
            raise SpecError(f"{w} lists a value twice: {list(values)}")
        if key in fixed:
            raise SpecError(f"{w}: {key} is both in `set` and in `grid`; keep one")
        axes.append((key, vals))
    return axes


def _stage_spec(path: str, preset_name: str, k: int, table: dict, first: bool) -> StageSpec:
    """Parse `[stageK]`: steps, set (fixed overrides), grid (field -> non-empty list of distinct values; or a list of
    such tables, whose products are joined: see `StageSpec`)."""
    where = f"{path}: [stage{k}]"
    _check_keys(where, table, STAGE_KEYS)
    base = preset(preset_name, k)
    steps = table.get("steps")
    if steps is not None:
        _typed(f"{where} steps", steps, int, "an integer >= 1", lambda v: v >= 1)
    fixed = _flatten(_typed(f"{where} set", table.get("set", {}), dict, 'a table like { "train.lr" = 1e-3 }'))
    sets = tuple((key, _check_field(f"{where} set {key}", base, key, v, first)) for key, v in fixed.items())
    grid = table.get("grid", {})
    rule = 'a table like { "loss.t_prime" = [0.5, 1] } or a list of such tables'
    tables = _typed(f"{where} grid", grid, (dict, list), rule, lambda g: isinstance(g, dict) or len(g) > 0)
    tables = [tables] if isinstance(tables, dict) else tables
    parts = [_grid_axes(f"{where} grid" + (f"[{i}]" if isinstance(grid, list) else ""), base,
                        _typed(f"{where} grid[{i}]", t, dict, rule), fixed, first) for i, t in enumerate(tables)]
    keys = list(dict.fromkeys(key for axes in parts for key, _ in axes))
    defaults = {key: _field_value(base, key) for key in keys}
    combos = []
    for axes in parts:
        for values in itertools.product(*[vals for _, vals in axes]):
            combo = {**defaults, **dict(zip([key for key, _ in axes], values))}
            full = tuple((key, combo[key]) for key in keys)
            if full not in combos:
                combos.append(full)
    grid_axes = tuple((key, tuple(dict.fromkeys(c[i][1] for c in combos))) for i, key in enumerate(keys))
    return StageSpec(steps, sets, grid_axes, tuple(combos))


def _eval_spec(path: str, table: dict) -> EvalSpec:
    where = f"{path}: [eval]"
    _check_keys(where, table, [f.name for f in dataclasses.fields(EvalSpec)])
    kw = dict(table)
    if "n" in kw:
        _typed(f"{where} n", kw["n"], int, "an integer >= 2 (images per score)", lambda v: v >= 2)
    if "t_mid" in kw:
        kw["t_mid"] = float(_typed(f"{where} t_mid", kw["t_mid"], (int, float), "a number > 0", lambda v: v > 0))
    if "seed" in kw:
        _typed(f"{where} seed", kw["seed"], int, "an integer 0 <= seed < 2**53", _seed_ok)
    if "batch" in kw:
        _typed(f"{where} batch", kw["batch"], int, "an integer >= 1", lambda v: v >= 1)
    if "every" in kw:
        _typed(f"{where} every", kw["every"], int, "an integer >= 0 (steps; 0 = no evaluation during training)",
               lambda v: v >= 0)
    if "draws" in kw:
        _typed(f"{where} draws", kw["draws"], int, "an integer >= 1 (noise draws per score)", lambda v: v >= 1)
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
    seeds = _int_list(f"{path}: seeds", raw.get("seeds", [0]), "integers 0 <= seed < 2**32 (train.seed's range)",
                      lambda v: 0 <= v < 2 ** 32)
    if out is not None and not str(out).strip():
        raise SpecError(f"{path}: the output folder (--out) is empty: give a folder path, e.g. runs/sweeps/NAME")
    out = str(out) if out is not None else _typed(f"{path}: out", raw.get("out", f"runs/sweeps/{Path(path).stem}"),
                                                  str, "a folder path (string)", lambda v: bool(v.strip()))
    specs = tuple((k, _stage_spec(path, name, k, raw.get(f"stage{k}", {}), k == stages[0])) for k in stages)
    _check_start(path, name, list(stages), *specs[0])
    return SweepSpec(path, name, seeds, out, specs, control, _eval_spec(path, raw.get("eval", {})))


def _seed_ok(v: int) -> bool:
    """An [eval] seed torch takes (manual_seed: below 2**64; an evaluation adds its draws) and JSON keeps exact."""
    return 0 <= v < 2 ** 53


def _check_start(path: str, name: str, stages: list[int], k: int, st: StageSpec) -> None:
    """The spec's first stage gives what train() needs to start it: every stage-2 point, and a CIFAR-10 stage-1
    point not trained from scratch, starts from init_from (without it, each of those points would fail)."""
    base = preset(name, k)
    for combo in st.combos:
        v = {key: _field_value(base, key) for key in ("init_from", "from_scratch", "data.name")}
        v.update(st.set + combo)
        if v["init_from"] is not None:
            continue
        if k == 2:
            raise SpecError(f"{path}: stages = {stages} has no stage 1, and stage 2 starts from a stage-1 run: add 1 "
                            f'to stages, or give that run as [stage2] set = {{ "init_from" = "RUN_DIR" }}')
        if k == 1 and v["data.name"] == "cifar10" and not v["from_scratch"]:
            raise SpecError(f"{path}: CIFAR-10 stage 1 starts from a diffusion model (TCM App. E): give [stage1] set = "
                            f'{{ "init_from" = "edm-cifar10-32x32-uncond-vp.pkl" }} (or a stage-0/1 run), or set '
                            f'"from_scratch" = true')
