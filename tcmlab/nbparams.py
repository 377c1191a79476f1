"""Notebook parameters: type conversion and validation for papermill (`-p tprime 1` arrives as int).

A bad value raises ValueError naming the parameter and its valid range, in the cell right after `parameters`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import PRESETS, preset


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
    if isinstance(value, float) and not value.is_integer() or int(value) < 1:
        raise ValueError(f"parameter {name} must be a positive integer (or 0 for the preset's value), got {value!r}")
    return int(value)


def check_preset(name) -> str:
    if name not in PRESETS:
        raise ValueError(f"parameter preset must be one of {sorted(PRESETS)}, got {name!r}")
    return name


def with_steps(cfg, steps):
    return cfg if steps is None else dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))


def stage2_config(preset_name, stage1_run, tprime, w_b, rho, psi_scale, psi_nu, steps=None, teacher_dropout=True):
    """The stage-2 RunConfig of notebook 02's parameters; TCMConfig names the offending parameter on bad input."""
    cfg = preset(check_preset(preset_name), 2, init_from=str(stage1_run))
    loss = dataclasses.replace(cfg.loss, t_prime=as_float("tprime", tprime), w_b=as_float("w_b", w_b),
                               rho=as_float("rho", rho), psi_scale=as_float("psi_scale", psi_scale),
                               psi_nu=as_float("psi_nu", psi_nu),
                               teacher_dropout=as_bool("teacher_dropout", teacher_dropout))
    return with_steps(dataclasses.replace(cfg, loss=loss), as_steps("steps", steps))


def find_stage1(stage1_run: str | None, out: str | Path) -> Path | None:
    """The stage-1 run to start from: the given one, or `<out>/stage1` if notebook 01 left one there."""
    if stage1_run:
        p = Path(stage1_run)
        if not (p / "latest.safetensors").exists() and not p.is_file():
            raise ValueError(f"parameter stage1_run={stage1_run!r} holds no stage-1 checkpoint: run notebook 01 "
                             f"or give the run directory that holds latest.safetensors")
        return p
    p = Path(out) / "stage1"
    return p if (p / "latest.safetensors").exists() else None
