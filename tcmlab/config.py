"""Configs: small frozen dataclasses whose defaults cite their source, and named presets for each scale.

A `RunConfig` describes one training stage: data, network, optimisation, and the stage's loss config
(`EDMConfig` = stage 0, `ECTConfig` = stage 1, `TCMConfig` = stage 2). `preset(name, stage)` returns the named
preset; vary it with `dataclasses.replace`. Every value is checked on construction; a bad value raises ValueError
naming the field and its valid range.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Union

from .precond import T_MAX
from .schedules import R_MIN, n_boundary


def _require(ok: bool, name: str, rule: str, value) -> None:
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON's true/false load as bools, a subclass of int


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and abs(v) <= sys.float_info.max  # finite; a huge int compares exactly


# A JSON value of a field, by the field's annotation: (accepts, stored as, the rule its error states). JSON has lists
# for tuples, and a hand-written 1 for 1.0.
_JSON_TYPES = {
    "int": (_is_int, int, "an integer"),
    "float": (_is_number, float, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), bool, "true or false"),
    "str": (lambda v: isinstance(v, str), str, "a string"),
    "str | None": (lambda v: v is None or isinstance(v, str), lambda v: v, "a string or null"),
    "tuple[int, ...]": (lambda v: isinstance(v, (list, tuple)) and all(map(_is_int, v)), tuple, "a list of integers"),
    "tuple[float, float]": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(map(_is_number, v)),
                            lambda v: tuple(map(float, v)), "a list of two finite numbers"),
}


def _json_value(value, annotation: str, path: str):
    """A config file's value of a field, checked against the field's annotation (`_JSON_TYPES`), in that type."""
    accepts, stored_as, rule = _JSON_TYPES[annotation]
    _require(accepts(value), path, rule, value)
    return stored_as(value)


def _require_fields(cfg, prefix: str) -> None:
    """Every field of a config section has its annotation's type (`_JSON_TYPES`: a config built in Python is checked
    as strictly as one read from a file, so every config that trains can be read back), and every number (also
    inside tuples) is finite: nan and inf pass `> 0`-style range checks."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        _require(_JSON_TYPES[f.type][0](v), f"{prefix}.{f.name}", _JSON_TYPES[f.type][2], v)
        for x in v if isinstance(v, tuple) else (v,):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                continue
            _require(math.isfinite(x), f"{prefix}.{f.name}", "a finite number", v)


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # 'digits' (embedded default) | 'toy2d' | 'cifar10' | 'synthetic'
    toy: str = "moons"  # toy2d only: 'moons' | 'gaussians8'
    root: str = "data/downloads"  # cifar10 only: folder holding cifar-10-batches-py/
    synthetic_n: int = 4096  # synthetic only: number of random CIFAR-shaped images

    def __post_init__(self):
        _require_fields(self, "data")
        _require(self.name in ("digits", "toy2d", "cifar10", "synthetic"), "data.name",
                 "one of 'digits', 'toy2d', 'cifar10', 'synthetic'", self.name)
        _require(self.toy in ("moons", "gaussians8"), "data.toy", "'moons' or 'gaussians8'", self.toy)
        _require(self.synthetic_n >= 2, "data.synthetic_n", ">= 2", self.synthetic_n)


@dataclass(frozen=True)
class NetConfig:
    arch: str = "ddpmpp"  # 'mlp' | 'ddpmpp' (EDM SongUNet, TCM App. E for CIFAR-10)
    channels: int = 128  # DDPM++ model_channels (EDM train.py --arch=ddpmpp); MLP hidden width
    depth: int = 4  # DDPM++ num_blocks per resolution (EDM); MLP residual blocks
    channel_mult: tuple[int, ...] = (2, 2, 2)  # DDPM++ (EDM --arch=ddpmpp)
    attn_resolutions: tuple[int, ...] = (16,)  # DDPM++ (EDM)
    emb_channels: int = 64  # MLP only: width of the time embedding
    dropout: float = 0.2  # TCM/ECT CIFAR-10 (docs/decisions.md §15)

    def __post_init__(self):
        _require_fields(self, "net")
        _require(self.arch in ("mlp", "ddpmpp"), "net.arch", "'mlp' or 'ddpmpp'", self.arch)
        _require(self.channels >= 1, "net.channels", ">= 1", self.channels)
        _require(self.depth >= 1, "net.depth", ">= 1", self.depth)
        _require(self.emb_channels >= 2 and self.emb_channels % 2 == 0, "net.emb_channels", "an even number >= 2",
                 self.emb_channels)
        _require(0 <= self.dropout < 1, "net.dropout", "in [0, 1)", self.dropout)
        _require(len(self.channel_mult) >= 1 and all(isinstance(m, int) and m >= 1 for m in self.channel_mult),
                 "net.channel_mult", "one or more integers >= 1, comma-separated (one per resolution)",
                 self.channel_mult)
        _require(all(isinstance(r, int) and r >= 1 for r in self.attn_resolutions), "net.attn_resolutions",
                 "integers >= 1 (resolutions with attention; may be empty)", self.attn_resolutions)


# TrainConfig fields that change how a run computes, not what (tcmlab.precision, tcmlab.speedups).
SPEED_FIELDS = ("cudnn_benchmark", "channels_last", "compile")
# TrainConfig fields that change how a run is recorded or fits in memory: metrics rows, checkpoint interval, rows per
# forward pass (gradient accumulation: the same gradient up to float rounding; dropout masks are drawn per pass).
BOOKKEEPING_FIELDS = ("log_every", "ckpt_every", "batch_gpu")
# A run may be resumed, and a finished sweep point kept, with other values of these (rundir.check_same_run).
FREE_FIELDS = SPEED_FIELDS + BOOKKEEPING_FIELDS
# TrainConfig fields a run may go on with other values of only when the caller names them (train(allow_change=...),
# CLI --allow-change): a lower lr or another precision from the last checkpoint after a non-finite step
# (docs/decisions.md §20). From then on the run is the run with the new values.
RECOVERY_FIELDS = ("lr", "precision")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 250_000  # TCM App. E, CIFAR-10 stage 1
    batch: int = 512  # global batch; TCM CIFAR-10 stage 1 (official README)
    batch_gpu: int = 0  # rows per forward pass on one device (gradient accumulation); 0 = batch / world size
    optimizer: str = "radam"  # TCM/ECT CIFAR-10: RAdam
    lr: float = 1e-4  # TCM CIFAR-10 stage 1 (official README)
    betas: tuple[float, float] = (0.9, 0.999)  # ECT code, RAdam
    lr_t_ref: int = 0  # inverse-sqrt decay reference (TCM App. E, ImageNet); 0 = constant lr (CIFAR-10)
    ema: str = "const"  # 'const' (CIFAR-10) | 'power' (EDM2 power-function EMA, ImageNet)
    ema_beta: float = 0.9999  # TCM/ECT CIFAR-10
    ema_gamma: float = 6.94  # TCM App. E power-EMA γ (official README uses 16.97)
    # 'fp32' (ECT/TCM CIFAR-10: TF32 off) | 'tf32' | 'bf16' | 'fp16' (with a gradient scaler); tcmlab.precision
    precision: str = "fp32"
    cudnn_benchmark: bool = True  # cuDNN's per-shape algorithm search: on in EDM's and ECT's training loops
    # GPU speed options, not in the official code (tcmlab.speedups): channels_last weights and images, torch.compile
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    log_every: int = 100  # steps between metrics.jsonl rows (official code: 1 tick = 100 iterations)
    ckpt_every: int = 5000  # steps between checkpoints (also at the end); ours (official: every --ckpt ticks)
    # Iteration counter i = step + step_offset, read by the lr schedule, the EMA and ratio(i). 0: each stage counts
    # from 0 (tcmlab default). The official stage 2 continues stage 1's count (`--resume_tick`): set it to the
    # stage-1 step count to reproduce that (docs/decisions.md §11).
    step_offset: int = 0

    def __post_init__(self):
        _require_fields(self, "train")
        _require(self.steps >= 1, "train.steps", ">= 1", self.steps)
        _require(self.batch >= 2, "train.batch", ">= 2", self.batch)
        _require(self.batch_gpu >= 0, "train.batch_gpu", ">= 0", self.batch_gpu)
        _require(self.optimizer in ("radam", "adam"), "train.optimizer", "'radam' or 'adam'", self.optimizer)
        _require(self.lr > 0, "train.lr", "> 0", self.lr)
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas", "two values in [0, 1)",
                 self.betas)
        _require(self.lr_t_ref >= 0, "train.lr_t_ref", ">= 0", self.lr_t_ref)
        _require(self.ema in ("const", "power"), "train.ema", "'const' or 'power'", self.ema)
        _require(0 <= self.ema_beta < 1, "train.ema_beta", "in [0, 1)", self.ema_beta)
        _require(self.ema_gamma > 0, "train.ema_gamma", "> 0", self.ema_gamma)
        _require(self.precision in ("fp32", "tf32", "bf16", "fp16"), "train.precision",
                 "'fp32', 'tf32', 'bf16' or 'fp16'", self.precision)
        for name in SPEED_FIELDS:
            _require(isinstance(getattr(self, name), bool), f"train.{name}", "true or false", getattr(self, name))
        # train.py seeds with seed·1000 + rank and, resuming on more ranks, (seed·1000 + rank)·1_000_003 + step:
        # below 2^32 both stay far below torch.manual_seed's 2^64 (and int64's 2^63) for any rank < 1000
        _require(0 <= self.seed < 2**32, "train.seed", "an integer in [0, 2**32)", self.seed)
        _require(self.log_every >= 1, "train.log_every", ">= 1", self.log_every)
        _require(self.ckpt_every >= 1, "train.ckpt_every", ">= 1", self.ckpt_every)
        _require(self.step_offset >= 0, "train.step_offset", ">= 0", self.step_offset)


@dataclass(frozen=True)
class EDMConfig:
    """Stage 0: EDM diffusion pretraining (Karras et al. 2022)."""

    P_mean: float = -1.2  # EDM
    P_std: float = 1.2  # EDM

    def __post_init__(self):
        _require_fields(self, "loss")
        _require(self.P_std > 0, "loss.P_std", "> 0", self.P_std)


# schedules.R_MIN: r = t − Δt is clamped at 1e-6 (official code), so at t <= 1e-6 r >= t and the weight 1/Δt of
# the loss is negative or infinite (training would ascend the loss)
_ABOVE_R_MIN = f"> {R_MIN:g} (r = t − Δt is clamped at {R_MIN:g}, so below it the weight 1/Δt is negative)"


@dataclass(frozen=True)
class ECTConfig:
    """Stage 1: ECT consistency training (TCM Eq. 4, App. E)."""

    P_mean: float = -1.1  # TCM App. E, CIFAR-10
    P_std: float = 2.0  # TCM App. E, CIFAR-10
    t_min: float = 0.002  # official TCM code (t_lower)
    t_max: float = T_MAX  # T, TCM App. E
    q: float = 2.0  # TCM App. E, CIFAR-10
    d: int = 25_000  # TCM App. E, doubling period in iterations
    ratio_max: float = 0.999  # TCM App. E, CIFAR-10
    c: float = 1e-8  # pseudo-Huber c, TCM App. E, CIFAR-10
    weighting: str = "inv_dt"  # ω(t)/Δt: 'inv_dt' (ω = 1, CIFAR-10) | 'cout_sq' (ImageNet)

    def __post_init__(self):
        _require_fields(self, "loss")
        _require(self.P_std > 0, "loss.P_std", "> 0", self.P_std)
        _require(0 < self.t_min < self.t_max, "loss.t_min", f"in (0, t_max={self.t_max})", self.t_min)
        _require(self.t_min > R_MIN, "loss.t_min", _ABOVE_R_MIN, self.t_min)
        _require(self.q > 1, "loss.q", "> 1", self.q)
        _require(self.d >= 1, "loss.d", ">= 1", self.d)
        _require(0 < self.ratio_max < 1, "loss.ratio_max", "in (0, 1)", self.ratio_max)
        _require(self.c >= 0, "loss.c", ">= 0", self.c)
        _require(self.weighting in ("inv_dt", "cout_sq"), "loss.weighting", "'inv_dt' or 'cout_sq'", self.weighting)


@dataclass(frozen=True)
class TCMConfig:
    """Stage 2: truncated consistency training (TCM §3, Eq. 7–11, Algorithm 1; docs/decisions.md §4–§11)."""

    t_prime: float = 1.0  # dividing time t′, TCM §4 (CIFAR-10, ImageNet)
    w_b: float = 0.1  # boundary weight w_b = λ_b/(1 − λ_b) of Eq. (10), TCM §4 / official README (decisions §6)
    rho: float = 0.25  # share of each batch spent on L_B, N_B = int(B·ρ), TCM §4 / official README (decisions §5)
    psi_scale: float = 0.2  # log-Student-t scale of ψ̄_t, TCM §4.4
    psi_nu: float = 0.01  # log-Student-t degrees of freedom ν, TCM §4.4
    t_max: float = T_MAX  # T
    ratio: float = 0.999  # held at ratio_max for all of stage 2, TCM App. E
    c: float = 1e-8  # pseudo-Huber c, as stage 1
    weighting: str = "inv_dt"  # as stage 1
    teacher_dropout: bool = True  # θ0 with dropout and the student's mask (official code); False = eval mode (paper)
    teacher_passes: str = "routed"  # 'routed' (ours) | 'full' (official: θ0 and θ⁻ on the whole batch), decisions §7

    def __post_init__(self):
        _require_fields(self, "loss")
        _require(0 < self.t_prime < self.t_max, "tprime (loss.t_prime)", f"in (0, T={self.t_max:g})", self.t_prime)
        _require(self.t_prime > R_MIN, "tprime (loss.t_prime)", _ABOVE_R_MIN, self.t_prime)
        _require(self.w_b >= 0, "w_b (loss.w_b)", ">= 0", self.w_b)
        _require(0 < self.rho < 1, "rho (loss.rho)", "in (0, 1)", self.rho)
        _require(self.psi_scale > 0, "psi_scale (loss.psi_scale)", "> 0", self.psi_scale)
        _require(self.psi_nu > 0, "psi_nu (loss.psi_nu)", "> 0", self.psi_nu)
        _require(0 < self.ratio < 1, "loss.ratio", "in (0, 1)", self.ratio)
        _require(self.c >= 0, "loss.c", ">= 0", self.c)
        _require(self.weighting in ("inv_dt", "cout_sq"), "loss.weighting", "'inv_dt' or 'cout_sq'", self.weighting)
        _require(self.teacher_passes in ("routed", "full"), "loss.teacher_passes", "'routed' or 'full'",
                 self.teacher_passes)


LossConfig = Union[EDMConfig, ECTConfig, TCMConfig]
STAGE_OF = {EDMConfig: 0, ECTConfig: 1, TCMConfig: 2}
LOSS_OF_STAGE = {v: k for k, v in STAGE_OF.items()}


@dataclass(frozen=True)
class RunConfig:
    """One training stage. `init_from`: run directory (or checkpoint file) of the previous stage, or None."""

    name: str
    data: DataConfig
    net: NetConfig
    train: TrainConfig
    loss: LossConfig = field(default_factory=ECTConfig)
    init_from: str | None = None
    # Stage 1 from random weights is asked for: CIFAR-10 refuses without it (App. E starts from EDM's checkpoint),
    # other data warn (train.py).
    from_scratch: bool = False

    def __post_init__(self):
        if isinstance(self.init_from, str) and self.init_from:  # "runs/s1/" and "runs/s1" are one run (on resume)
            object.__setattr__(self, "init_from", os.path.normpath(self.init_from))
        _require(isinstance(self.name, str) and self.name != "", "name", "a non-empty string (the preset's name)",
                 self.name)
        _require(self.init_from is None or isinstance(self.init_from, str), "init_from", "a path or None",
                 self.init_from)
        _require(isinstance(self.from_scratch, bool), "from_scratch", "true or false", self.from_scratch)
        _require(type(self.loss) in STAGE_OF, "loss", "an EDMConfig, ECTConfig or TCMConfig", self.loss)
        _require(self.stage > 0 or self.init_from is None, "init_from",
                 "empty for stage 0 (diffusion pretraining starts from random weights; init_from is for stages 1, 2)",
                 self.init_from)
        if self.stage == 2:
            n_b = n_boundary(self.train.batch, self.loss.rho)
            _require(self.train.batch - n_b >= 1, "rho",
                     "small enough to leave consistency rows in the batch", self.loss.rho)
            # TCM §3 / Eq. (7): without samples at t′ the boundary loss vanishes and the objective can collapse
            _require(n_b >= 1 or self.loss.w_b == 0, "rho (loss.rho)",
                     f"large enough for N_B = int(batch·rho) >= 1 boundary row at batch {self.train.batch} (or set "
                     f"loss.w_b = 0 to train without the boundary loss)", self.loss.rho)

    @property
    def stage(self) -> int:
        return STAGE_OF[type(self.loss)]

    @property
    def t_max(self) -> float:
        """T of this stage: the loss config's t_max (stages 1, 2), else T_MAX (stage 0's log-normal is cut there)."""
        return getattr(self.loss, "t_max", T_MAX)


def to_dict(cfg: RunConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["stage"] = cfg.stage
    return d


def with_free_fields_of(cfg: RunConfig, other: RunConfig) -> RunConfig:
    """cfg with other's values of FREE_FIELDS and data.root (where the data lies, not what it is: a data set mounted
    elsewhere is the same run): compare the result with `other` to ask whether two configs are the same run."""
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, **{k: getattr(other.train, k) for k in FREE_FIELDS}),
        data=dataclasses.replace(cfg.data, root=other.data.root))


def from_dict(d: dict, strict: bool = False) -> RunConfig:
    """The RunConfig of `to_dict`'s output. A missing field takes its default (a checkpoint written before the field
    existed). strict: refuse keys that name no field (a config file a person wrote: a typo must not be dropped);
    otherwise they are ignored (a checkpoint of a newer tcmlab, read by an older one). Every value must have its
    field's type (`_JSON_TYPES`): a ValueError names the field, the value and the type."""
    d = dict(d)
    stage = d.pop("stage")
    _require(_is_int(stage) and stage in LOSS_OF_STAGE, "stage", "0, 1 or 2", stage)
    top = {"name", "data", "net", "train", "loss", "init_from", "from_scratch"}
    unknown = [k for k in d if k not in top]

    def build(cls, values, section):
        _require(isinstance(values, dict), section, f"an object of {cls.__name__} fields", values)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown.extend(f"{section}.{k}" for k in values if k not in names)
        return cls(**{f.name: _json_value(values[f.name], f.type, f"{section}.{f.name}")
                      for f in dataclasses.fields(cls) if f.name in values})

    parts = {s: build(cls, d[s], s) for s, cls in (("data", DataConfig), ("net", NetConfig), ("train", TrainConfig),
                                                   ("loss", LOSS_OF_STAGE[stage]))}
    if strict and unknown:
        raise ValueError(f"unknown config field(s) {', '.join(unknown)} (stage {stage}): check the spelling; the "
                         f"fields are those of a run's config.json")
    annotation = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    return RunConfig(name=_json_value(d["name"], annotation["name"], "name"), **parts,
                     **{k: _json_value(d[k], annotation[k], k) for k in ("init_from", "from_scratch") if k in d})


def to_json(cfg: RunConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


# --------------------------------------------------------------------------------------------------------------------
# Presets. Each is (stage 0, stage 1, stage 2); `init_from` (the previous stage's run directory) is given by the
# caller: `preset("digits", 2, init_from="runs/s1")`. Stage 2 refuses to train without it.

def _small(name, data, net, train, edm_steps, ect_steps, tcm_steps, d, ratio_max, lr2, lr0=None, t_max=T_MAX):
    ect = ECTConfig(d=d, ratio_max=ratio_max, t_max=t_max)
    return (
        RunConfig(name, data, net, dataclasses.replace(train, steps=edm_steps, lr=lr0 or train.lr), EDMConfig()),
        RunConfig(name, data, net, dataclasses.replace(train, steps=ect_steps), ect),
        RunConfig(name, data, net, dataclasses.replace(train, steps=tcm_steps, lr=lr2),
                  TCMConfig(ratio=ratio_max, t_max=t_max)),
    )


_DIGITS_NET = NetConfig(arch="mlp", channels=512, depth=4, emb_channels=64, dropout=0.1)
_DIGITS_TRAIN = TrainConfig(steps=1, batch=256, optimizer="radam", lr=1e-3, ema="const", ema_beta=0.999,
                            log_every=50, ckpt_every=1000)

PRESETS: dict[str, tuple[RunConfig | None, RunConfig, RunConfig]] = {
    # ci: every stage in seconds on a CPU (tests, nbval).
    "ci": _small("ci", DataConfig("digits"), NetConfig(arch="mlp", channels=64, depth=2, emb_channels=32, dropout=0.1),
                 TrainConfig(steps=1, batch=64, lr=1e-3, ema_beta=0.9, log_every=5, ckpt_every=20),
                 edm_steps=20, ect_steps=20, tcm_steps=20, d=5, ratio_max=0.99, lr2=5e-4),
    # digits: the embedded default, sized for `make demo` on 2 CPU cores (sklearn's 1,797 8×8 digits). Stage 0 at
    # lr 5e-3 for 3,000 steps, stage 1 with d = 250 for 2,500, stage 2 for 500, and T = 10 in stages 1 and 2 instead of
    # TCM's 80 (App. E, CIFAR-10 and ImageNet): Song & Ermon's rule (2020, technique 1) puts the largest noise level
    # at the largest distance between two training images, 9.6 for the digits (docs/decisions.md §18).
    # sweeps/digits_fast.toml, measured against T = 80 (sweeps/digits_fast_T80.toml) and the earlier recipes in
    # docs/results/digits_recipe.md, with the demo's time.
    "digits": _small("digits", DataConfig("digits"), _DIGITS_NET, _DIGITS_TRAIN,
                     edm_steps=3000, ect_steps=2500, tcm_steps=500, d=250, ratio_max=0.99, lr2=5e-4, lr0=5e-3,
                     t_max=10.0),
    # toy2d: two moons, CPU seconds to minutes.
    "toy2d": _small("toy2d", DataConfig("toy2d"), NetConfig(arch="mlp", channels=128, depth=3, dropout=0.0),
                    TrainConfig(steps=1, batch=512, lr=1e-3, ema_beta=0.999, log_every=50, ckpt_every=1000),
                    edm_steps=2000, ect_steps=3000, tcm_steps=1500, d=375, ratio_max=0.99, lr2=5e-4),
    # cifar10: TCM App. E and the official README (docs/decisions.md §15).
    # Stage 1 starts from the EDM checkpoint (no stage 0).
    "cifar10": (
        None,
        RunConfig("cifar10", DataConfig("cifar10"), NetConfig(),
                  TrainConfig(steps=250_000, batch=512, lr=1e-4, ema_beta=0.9999), ECTConfig()),
        RunConfig("cifar10", DataConfig("cifar10"), NetConfig(),
                  TrainConfig(steps=200_000, batch=1024, lr=5e-5, ema_beta=0.9999), TCMConfig()),
    ),
}


def _parse_value(text: str, current, name: str):
    """A command-line value in the type of the field it replaces."""
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if isinstance(current, tuple):
            items = [x for x in text.replace("(", "").replace(")", "").split(",") if x.strip()]
            kind = type(current[0]) if current else float
            return tuple(kind(x) for x in items)
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        return None if text.lower() in ("none", "") else text
    except ValueError:
        raise ValueError(f"--set {name}={text}: expected a value like {current!r}") from None


# field -> (the field that decides whether it is read, the value that reads it)
READ_ONLY_WITH = {"data.toy": ("data.name", "toy2d"), "data.root": ("data.name", "cifar10"),
                  "data.synthetic_n": ("data.name", "synthetic"), "net.emb_channels": ("net.arch", "mlp"),
                  "net.channel_mult": ("net.arch", "ddpmpp"), "net.attn_resolutions": ("net.arch", "ddpmpp")}


def _get(cfg: RunConfig, key: str):
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


def unread_fields(cfg: RunConfig) -> dict[str, str]:
    """Fields this config never reads (data.root without CIFAR-10, the MLP's time-embedding width in a DDPM++ run,
    ...), each with why ("only a run with data.name='cifar10' reads it"): a value given for one has no effect."""
    return {key: f"only a run with {field}={needed!r} reads it, and this one has {field}={_get(cfg, field)!r}"
            for key, (field, needed) in READ_ONLY_WITH.items() if _get(cfg, field) != needed}


def with_overrides(cfg: RunConfig, items: list[str], warn_unread: bool = True) -> RunConfig:
    """Apply `section.field=value` overrides (sections: data, net, train, loss), e.g. ["train.steps=100",
    "net.channels=8"]; values take the field's type and are validated like any config. An override of a field the
    resulting config never reads (`unread_fields`) is warned about, unless `warn_unread` is False (a caller that
    applies the items one at a time)."""
    sections = {"data": cfg.data, "net": cfg.net, "train": cfg.train, "loss": cfg.loss}
    top = {}
    for item in items:
        key, sep, text = item.partition("=")
        if sep and key.strip() in ("name", "init_from", "from_scratch"):  # top-level RunConfig fields
            top[key.strip()] = _parse_value(text.strip(), getattr(cfg, key.strip()), key.strip())
            continue
        if not sep:
            raise ValueError(f"--set {item!r}: expected field=value, with '=' between the field and its value "
                             f"(e.g. --set train.steps=100)")
        section, _, name = key.strip().partition(".")
        if section not in sections or name not in {f.name for f in dataclasses.fields(sections[section])}:
            known = ["name", "init_from", "from_scratch"] + [f"{k}.{f.name}" for k, v in sections.items()
                                                              for f in dataclasses.fields(v)]
            close = difflib.get_close_matches(key.strip(), known, n=3)
            other = [f"stage {s}" for s, cls in LOSS_OF_STAGE.items() if s != cfg.stage and section == "loss"
                     and name in {f.name for f in dataclasses.fields(cls)}]
            hint = (f" loss.{name} is a field of {' and '.join(other)}, not of stage {cfg.stage}." if other else
                    f" Did you mean {' or '.join(close)}?" if close else "")
            raise ValueError(f"--set {item!r}: expected field=value with a field of this stage-{cfg.stage} config."
                             f"{hint} The fields: {', '.join(known)}")
        sub = sections[section]
        sections[section] = dataclasses.replace(sub, **{name: _parse_value(text.strip(), getattr(sub, name), key)})
    new = dataclasses.replace(cfg, **sections, **top)
    unread = unread_fields(new) if warn_unread else {}
    for key in dict.fromkeys(item.partition("=")[0].strip() for item in items):
        if key in unread:
            warnings.warn(f"--set {key}: {unread[key]}; the value has no effect", stacklevel=2)
    return new


def preset(name: str, stage: int, **overrides) -> RunConfig:
    """The named preset for one stage (0, 1 or 2); keyword overrides replace top-level RunConfig fields."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    if stage not in (0, 1, 2):
        raise ValueError(f"stage must be 0, 1 or 2, got {stage!r}")
    cfg = PRESETS[name][stage]
    if cfg is None:
        raise ValueError(f"preset {name!r} has no stage {stage}: stage 1 starts from the official EDM checkpoint")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
