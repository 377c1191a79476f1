"""Building the preconditioned model of a config, and loading trained models from run directories."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint
from .config import RunConfig, from_dict
from .nets import build_net
from .precision import AUTOCAST
from .precond import Precond

CKPT_NAME = "latest.safetensors"


def build_model(cfg: RunConfig, shape: tuple[int, ...]) -> Precond:
    """f_θ = Precond(F_θ) for the config's network and the data's sample shape."""
    return Precond(build_net(cfg.net, shape), autocast_dtype=AUTOCAST[cfg.train.precision])


def device_of(f) -> torch.device:
    """The device a network's weights live on (CPU for a plain function or a module without parameters)."""
    p = next(f.parameters(), None) if isinstance(f, torch.nn.Module) else None
    return p.device if p is not None else torch.device("cpu")


def checkpoint_path(run: str | Path) -> Path:
    """A run directory's checkpoint, or the checkpoint file itself."""
    run = Path(run)
    if run.is_dir():
        return run / CKPT_NAME
    if run.suffix == ".safetensors" or run.exists():
        return run
    raise FileNotFoundError(f"{run} is neither a run directory nor a checkpoint file: check the path, or train that "
                            f"stage first (`python -m tcmlab train --preset PRESET --stage N --outdir {run}`)")


def load_state(run: str | Path, device="cpu") -> tuple[dict, RunConfig]:
    """(checkpoint state, its RunConfig) of a run directory or checkpoint file."""
    state = checkpoint.load(checkpoint_path(run), device=device)
    return state, from_dict(json.loads(state["config"]))


def model_state(state: dict, which: str) -> dict:
    if which not in ("ema", "raw"):
        raise ValueError(f"which must be 'ema' or 'raw', got {which!r}")
    return state["ema" if which == "ema" else "model"]


@dataclass
class TrainedModel:
    """A trained consistency model f (eval mode) with what samplers and evaluation need to know about it."""

    f: Precond
    cfg: RunConfig
    step: int
    which: str  # 'ema' or 'raw'
    shape: tuple[int, ...]

    @property
    def t_max(self) -> float:
        """T of the stage that trained this model (its config's t_max): where 1-step sampling starts."""
        return self.cfg.t_max

    @property
    def t_prime(self) -> float | None:
        """The dividing time of a stage-2 (truncated) model; None for stages 0 and 1."""
        return self.cfg.loss.t_prime if self.cfg.stage == 2 else None


def load_model(run: str | Path, which: str = "ema", device="cpu") -> TrainedModel:
    """Load the EMA (default) or raw weights of a run directory or checkpoint file for sampling/evaluation, on
    `device`, in eval mode, without gradients. Weights holding NaN/inf are refused, naming the tensor."""
    state, cfg = load_state(run, device)
    shape = tuple(state["shape"])
    weights = model_state(state, which)
    checkpoint.check_finite(weights, f"{checkpoint_path(run)} ({which} weights)")
    f = build_model(cfg, shape).to(device)
    f.load_state_dict(weights)
    f.eval().requires_grad_(False)
    return TrainedModel(f, cfg, int(state["step"]), which, shape)


def frozen_copy(f: Precond) -> Precond:
    """θ0 of TCM: a copy with requires_grad False (stopgrad), TCM Eq. (5)."""
    return copy.deepcopy(f).requires_grad_(False)
