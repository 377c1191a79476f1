"""Notebook parameters: type conversion and validation for papermill (`-p tprime 1` arrives as int).

A bad value raises ValueError naming the parameter and its valid range, in the cell right after `parameters`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from pathlib import Path

from .config import FREE_FIELDS, PRESETS, RunConfig, preset, with_overrides


def as_float(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"parameter {name} must be a number, got {value!r}") from None


def as_bool(name: str, value) -> bool:
    """A boolean parameter, parsed strictly: True/False, 1/0, or the strings true/false/yes/no/1/0 (any case).
    papermill passes `-p teacher_dropout false` as the string "false", which plain bool() would make True."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    raise ValueError(f"parameter {name} must be true or false, got {value!r}")


def as_steps(name: str, value) -> int | None:
    if value in (None, "", 0):
        return None
    try:
        ok = not isinstance(value, bool) and float(value).is_integer() and int(float(value)) >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"parameter {name} must be a positive integer (or 0 for the preset's value), got {value!r}")
    return int(float(value))


def check_preset(name) -> str:
    if name not in PRESETS:
        raise ValueError(f"parameter preset must be one of {sorted(PRESETS)}, got {name!r}")
    return name


def with_steps(cfg, steps):
    return cfg if steps is None else dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))


# (dfid_every, dfid_n) per preset: a few evaluations per stage (digits: two in its 500-step stage 2), n large enough
# for a stable FD at that scale.
DFID_DEFAULTS = {"ci": (10, 200), "digits": (250, 300), "toy2d": (500, 1000), "cifar10": (10_000, 5_000)}


# Noise draws per FID (`metrics.sample_quality(..., draws)`): on digits one draw moves a score by ~20
# (docs/decisions.md §16); the smoke test and the large-n presets take one.
DRAWS_DEFAULTS = {"ci": 1, "digits": 10, "toy2d": 1, "cifar10": 1}


PRESET_NOTES = {
    "ci": "preset ci is a smoke-test size (20 steps per stage, a tiny net): samples look like noise and FID is in "
          "the thousands. That is expected. For real results run with -p preset digits (CPU minutes).",
    "toy2d": "preset toy2d trains on 2-D points; scores are energy distances of the points, not FID.",
    "cifar10": "preset cifar10 is the paper's scale: run it on GPUs (-p gpus 8 trains under torchrun).",
}


def preset_note(preset_name: str) -> str:
    """A line the notebooks print under their parameters: what this preset's numbers can and cannot mean."""
    return PRESET_NOTES.get(check_preset(preset_name), "")


def dfid_settings(preset_name: str, dfid_every, dfid_n) -> tuple[int, int]:
    """dFID_t cadence and size: the parameters, or the preset's defaults where they are 0. n >= 2 (a covariance of
    one image is undefined; the CLI's --dfid-n and the sweeps' [eval] n refuse it too)."""
    every, n = DFID_DEFAULTS[check_preset(preset_name)]
    n = as_steps("dfid_n", dfid_n) or n
    if n < 2:
        raise ValueError(f"parameter dfid_n must be at least 2 (images per dFID_t: FD needs a covariance), got {n}")
    return as_steps("dfid_every", dfid_every) or every, n


def draws_setting(preset_name: str, draws) -> int:
    """Noise draws per score: the parameter, or the preset's default where it is 0."""
    return as_steps("draws", draws) or DRAWS_DEFAULTS[check_preset(preset_name)]


def parse_overrides(text) -> list[str]:
    """`overrides` parameter: whitespace-separated field=value items (as `--set`), e.g. "net.channels=16 train.batch=8"."""
    if text in (None, ""):
        return []
    if not isinstance(text, str):
        raise ValueError(f"parameter overrides must be a string of field=value items, got {text!r}")
    return text.split()


def applicable(cfg, items: list[str]) -> list[str]:
    """The override items that name a field of `cfg` (notebook 02's overrides are for stage 2; the stage 0/1 it trains
    when none is found take those of them that exist there, e.g. net.* and train.*, not loss.teacher_dropout)."""
    sections = [s.name for s in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, s.name))]
    fields = {f"{s}.{f.name}" for s in sections for f in dataclasses.fields(getattr(cfg, s))}
    fields |= {f.name for f in dataclasses.fields(cfg)}
    return [it for it in items if it.split("=", 1)[0] in fields]


def stage01_configs(preset_name, out, steps0=0, steps1=0, pretrain=True, init_from="", overrides="",
                    only_applicable=False):
    """Notebook 01's stage-0 and stage-1 RunConfigs. Stage 0 is None where the preset has none (cifar10: stage 1
    starts from EDM's checkpoint, `init_from`) or `pretrain` is false; stage 1 starts from `init_from` if given, else
    from this notebook's stage 0. only_applicable: apply only the overrides that name a field of each stage's config
    (notebook 02 passes its stage-2 overrides)."""
    name, items = check_preset(preset_name), parse_overrides(overrides)
    if init_from and not Path(init_from).exists():
        raise ValueError(f"parameter init_from={str(init_from)!r} does not exist: give an EDM pickle (.pkl), a "
                         f"stage-0/1 run directory or its latest.safetensors, or leave it empty to train stage 0 here")
    pick = (lambda cfg: applicable(cfg, items)) if only_applicable else (lambda cfg: items)
    cfg0 = None
    if PRESETS[name][0] is not None and as_bool("pretrain", pretrain) and not init_from:
        base0 = preset(name, 0)
        cfg0 = with_steps(with_overrides(base0, pick(base0)), as_steps("steps0", steps0))
    start = str(init_from) if init_from else (str(Path(out) / "stage0") if cfg0 is not None else None)
    base1 = preset(name, 1, init_from=start)
    cfg1 = with_steps(with_overrides(base1, pick(base1)), as_steps("steps1", steps1))
    return cfg0, cfg1


# Notebook 02's parameters for fields of TCMConfig: `overrides` may not set these (the parameter would win silently).
STAGE2_PARAMETERS = {"loss.t_prime": "tprime", "loss.w_b": "w_b", "loss.rho": "rho", "loss.psi_scale": "psi_scale",
                     "loss.psi_nu": "psi_nu", "train.steps": "steps", "init_from": "stage1_run"}


def stage2_config(preset_name, stage1_run, tprime, w_b, rho, psi_scale, psi_nu, steps=None, teacher_dropout=None,
                  overrides=""):
    """The stage-2 RunConfig of notebook 02's parameters; TCMConfig names the offending parameter on bad input.
    teacher_dropout None keeps the preset's (or an override's, e.g. `loss.teacher_dropout=false`, §8)."""
    items = parse_overrides(overrides)
    clash = [(it.split("=", 1)[0], STAGE2_PARAMETERS[it.split("=", 1)[0]]) for it in items
             if it.split("=", 1)[0] in STAGE2_PARAMETERS]
    if clash:
        raise ValueError("overrides " + ", ".join(f"{k} (use the parameter {p}: -p {p} VALUE)" for k, p in clash)
                         + ": these are notebook parameters, which would override the override")
    cfg = with_overrides(preset(check_preset(preset_name), 2, init_from=str(stage1_run)), items)
    loss = dataclasses.replace(cfg.loss, t_prime=as_float("tprime", tprime), w_b=as_float("w_b", w_b),
                               rho=as_float("rho", rho), psi_scale=as_float("psi_scale", psi_scale),
                               psi_nu=as_float("psi_nu", psi_nu))
    if teacher_dropout is not None:
        loss = dataclasses.replace(loss, teacher_dropout=as_bool("teacher_dropout", teacher_dropout))
    return with_steps(dataclasses.replace(cfg, loss=loss), as_steps("steps", steps))


def stage2_dir(out, cfg2, overrides="") -> Path:
    """Notebook 02's stage-2 run directory: named by t′, w_b, ρ and ψ̄'s scale and ν, then by the overrides that
    change the run (not train.steps, data.root or the options a run may change, `config.FREE_FIELDS`, nor one that
    gives the preset's own value), sorted, so that an ablation (say `loss.teacher_dropout=false`) gets its
    own folder beside the default run, whatever the order the overrides are written in."""
    L = cfg2.loss
    name = f"stage2-tp{L.t_prime:g}-wb{L.w_b:g}-rho{L.rho:g}-s{L.psi_scale:g}-nu{L.psi_nu:g}"
    free = {"data.root", "init_from", "train.steps", *(f"train.{k}" for k in FREE_FIELDS)}
    base = preset(cfg2.name, 2) if cfg2.name in PRESETS else None
    last = {it.split("=")[0]: it for it in parse_overrides(overrides)}  # a field given twice: the last one counts
    kept = sorted(it for key, it in last.items()
                  if key not in free and (base is None or with_overrides(base, [it], warn_unread=False) != base))
    return Path(out) / "-".join([name, *(re.sub(r"[^A-Za-z0-9._=]+", "_", it) for it in kept)])



def check_t_mid(t_mid, cfg2) -> float:
    """Notebook 02's 2-step time t_mid in (0, T); one below t′ is raised to t′ with a warning (a stage-2 model is
    trained on [t′, T]), as `python -m tcmlab evaluate` does (docs/decisions.md §14)."""
    t_mid = as_float("t_mid", t_mid)
    if not 0 < t_mid < cfg2.t_max:
        raise ValueError(f"parameter t_mid={t_mid:g} must be in (0, T) = (0, {cfg2.t_max:g}): the 2-step sampler goes "
                         f"T -> t_mid")
    if t_mid < cfg2.loss.t_prime:
        warnings.warn(f"t_mid={t_mid:g} is below tprime={cfg2.loss.t_prime:g}: the 2-step sampler uses t_mid = "
                      f"tprime (stage 2 is trained on [t', T]); -p t_mid sets another one", stacklevel=2)
        t_mid = cfg2.loss.t_prime
    return t_mid


def run_root(out, preset_name: str) -> Path:
    """Where a notebook's run directories go: $TCMLAB_NB_OUT (set by the tests), else the `out` parameter, else
    `../runs/nb/<preset>`: one folder per preset, so a digits run never meets the checkpoints a ci run left."""
    env = os.environ.get("TCMLAB_NB_OUT")
    return Path(env or out or Path("..") / "runs" / "nb" / check_preset(preset_name))


def log_span(value: float, lo: float, hi: float) -> tuple[float, float]:
    """A log10 slider's (min, max) exponents: [lo, hi] widened to hold `value` (> 0), so that ipywidgets does not
    clamp a parameter (ν = 10⁴, say) to the slider's end and show another ψ̄ than the one asked for."""
    e = math.log10(value)
    return min(lo, e), max(hi, e)


def w_b_choices(w_b: float) -> list[tuple[str, float]]:
    """Notebook 03's w_b slider: 0 (no boundary loss, no Dirac mass), then 0.001, 0.003, 0.01, … 3, 10, with `w_b`
    itself among them; (label, value) pairs for a SelectionSlider, since a log slider cannot reach 0."""
    values = sorted({0.0, *(round(m * 10.0 ** k, 3) for k in range(-3, 1) for m in (1, 3)), 10.0, float(w_b)})
    return [(f"{v:g}", v) for v in values]


def _stored(path: Path) -> tuple[int, RunConfig]:
    """(step, config) of a run directory's or checkpoint file's checkpoint, from its header alone."""
    from . import checkpoint
    from .config import from_dict
    from .model import checkpoint_path

    head = checkpoint.header(checkpoint_path(path))
    return int(head["step"]), from_dict(json.loads(head["config"]))


def find_stage1(stage1_run: str | None, out: str | Path) -> Path | None:
    """The stage-1 run to start from: the given one (a run directory or its .safetensors file), or `<out>/stage1`
    if it holds a finished run (notebook 01's, or this notebook's); None if there is none or it is unfinished: the
    notebook then trains it there (a partial run resumes)."""
    if stage1_run:
        if not isinstance(stage1_run, (str, Path)):  # papermill -p stage1_run 5 gives an int
            raise ValueError(f"parameter stage1_run={stage1_run!r} must be a path (a stage-1 run directory)")
        p = Path(stage1_run)
        if not (p / "latest.safetensors").exists() and not (p.is_file() and p.suffix == ".safetensors"):
            raise ValueError(f"parameter stage1_run={stage1_run!r} holds no stage-1 checkpoint: run notebook 01 "
                             f"or give the run directory that holds latest.safetensors")
        stage = _stored(p)[1].stage
        if stage != 1:
            raise ValueError(f"parameter stage1_run={stage1_run!r} holds a stage-{stage} run: stage 2 starts from a "
                             f"stage-1 (ECT) run, e.g. notebook 01's <out>/stage1")
        return p
    p = Path(out) / "stage1"
    if not (p / "latest.safetensors").exists():
        return None
    step, cfg = _stored(p)
    return p if step >= cfg.train.steps else None


def stage1_to_train(preset_name: str, out: str | Path, overrides="") -> tuple:
    """(cfg0, cfg1, note) of the stage 1 notebook 02 trains in `<out>/stage1` when `find_stage1` found none: an
    unfinished one there is resumed with its own config (steps, overrides, init_from as notebook 01 gave them; no
    stage 0), else the preset's stage 0 → 1 with the overrides that apply (`stage01_configs`)."""
    from .model import CKPT_NAME

    ckpt = Path(out) / "stage1" / CKPT_NAME
    if ckpt.exists():
        step, cfg1 = _stored(ckpt)
        return None, cfg1, (f"[tcmlab] stage 1: resuming the unfinished run in {ckpt.parent} at step {step} of "
                            f"{cfg1.train.steps}, with its own config")
    cfg0, cfg1 = stage01_configs(preset_name, out, overrides=overrides, only_applicable=True)
    return cfg0, cfg1, (f"no stage-1 run given or found in {out}: training the {preset_name!r} stage 1 there (after "
                        f"its stage 0, if any)")


def stage1_note(path: str | Path) -> str:
    """What notebook 02 prints about the stage-1 run it starts from: its step of its steps, and whether it is done."""
    step, cfg = _stored(Path(path))
    steps = cfg.train.steps
    done = "finished" if step >= steps else (f"UNFINISHED: stage 2 starts from its EMA at step {step} (train it to "
                                             f"its end first for a finished teacher)")
    return f"[tcmlab] stage 1: using the run in {path} at step {step} of {steps}, {done} (reused, not retrained)"


# The sweep notebook 04 runs per preset when no spec is given (sweeps/ in the repository).
SWEEP_DEFAULTS = {"ci": "ci.toml", "digits": "digits_claims.toml"}


def sweep_spec(preset_name: str, spec) -> Path:
    """Notebook 04's sweep spec: the `spec` parameter, or the preset's default from the repository's sweeps/."""
    if spec:
        path = Path(spec)
    elif check_preset(preset_name) in SWEEP_DEFAULTS:
        path = Path(__file__).resolve().parents[1] / "sweeps" / SWEEP_DEFAULTS[preset_name]
    else:
        raise ValueError(f"parameter spec is needed for preset {preset_name!r} (defaults exist for "
                         f"{sorted(SWEEP_DEFAULTS)}): a sweep TOML file, see sweeps/")
    if not path.exists():
        raise ValueError(f"parameter spec: {path} not found (sweep specs are in the repository's sweeps/ folder)")
    return path
