"""Sample-quality metrics through torch-fidelity: FID/KID, the real-vs-real floor, denoising FID dFID_t (TCM §2.2),
and an eval card on every number.

Embedded digits: features from the shipped digits CNN (`tcmlab-digits-cnn`, see data/digits_cnn.md). The digits are
split into two fixed disjoint halves: the *reference* half B, and the *query* half A that dFID noises and denoises.
The floor FD(A, B) is what a perfect model would score at this n, so every digits FID is reported beside it.
CIFAR-10: torch-fidelity's `inception-v3-compat`, reference = the full training set (as the official code);
`inception_weights` (or $TCMLAB_INCEPTION_WEIGHTS) points to a local weights file so an offline machine never
downloads. torch-fidelity unpickles that file, so its SHA-256 is checked against torch-fidelity's published one
first; torch-fidelity's on-disk statistics cache (also unpickled) is not used.
Protocol choices: docs/decisions.md §16.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from tqdm.auto import tqdm

from . import digits_classifier
from .data import cifar10, digits
from .model import device_of
from .precond import T_MAX
from .samplers import generate
from .viz import to_uint8

DIGITS_EXTRACTOR = "tcmlab-digits-cnn"
INCEPTION = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's release asset
INCEPTION_SHA256_PREFIX = "6726825d"  # published in the file name (torch.hub's check_hash convention)
DFID_GRID = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)  # dFID_t noise levels below T (TCM Fig. 2/3 span)


def dfid_ts(t_max: float = T_MAX) -> tuple[float, ...]:
    """The dFID_t grid of a model trained up to T = t_max: DFID_GRID below T, then T itself (dFID_T = 1-step FID)."""
    return tuple(t for t in DFID_GRID if t < t_max) + (float(t_max),)


DFID_TS = dfid_ts()


class DigitsFeatures(FeatureExtractorBase):
    """torch-fidelity extractor: 128-d penultimate features of the digits CNN, from uint8 [B, 1, 8, 8] images."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net = digits_classifier.load(feature_extractor_weights_path or digits_classifier.WEIGHTS)

    @staticmethod
    def get_provided_features_list():
        return ("penultimate",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "penultimate"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        if x.dtype != torch.uint8:
            raise ValueError(f"{DIGITS_EXTRACTOR} expects uint8 images, got {x.dtype}")
        return (self.net.features(x.float() / 127.5 - 1).to(torch.float64),)


def register() -> None:
    """Register the digits extractor with torch-fidelity (safe to call again, e.g. from a re-run notebook cell)."""
    if DIGITS_EXTRACTOR not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(DIGITS_EXTRACTOR, DigitsFeatures)


class U8Images(torch.utils.data.Dataset):
    """uint8 images [N, C, H, W] as the Dataset of tensors torch-fidelity expects."""

    def __init__(self, x: torch.Tensor):
        if x.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images, got {x.dtype}")
        self.x = x.cpu()

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.x[i]


@dataclass(frozen=True)
class EvalCard:
    """What a score means: two scores are comparable only if their cards agree on everything but `step`."""

    metric: str  # 'fid' | 'dfid'
    n: int  # images scored
    extractor: str
    extractor_sha256: str
    reference: str  # e.g. 'digits-halfB(899)' or 'cifar10-train(50000)'
    steps: tuple[float, ...] = ()  # sampler times (80,) or (80, t_mid); for dFID the noise level (t,)
    weights: str = "ema"  # 'ema' | 'raw'
    seed: int = 0
    step: int = -1  # training step of the checkpoint

    def comparable_with(self, other: "EvalCard") -> list[str]:
        """Fields that differ (other than the checkpoint step); empty means comparable."""
        a, b = asdict(self), asdict(other)
        return [k for k in a if k != "step" and a[k] != b[k]]


def check_comparable(a: EvalCard, b: EvalCard) -> None:
    diff = a.comparable_with(b)
    if diff:
        raise ValueError(f"scores are not comparable: their eval cards differ in {', '.join(diff)}")


@dataclass
class EvalSet:
    """Real images for evaluation: `query` (noised and denoised by dFID) and `reference` (the target distribution)."""

    name: str
    query: torch.Tensor  # uint8
    reference: torch.Tensor  # uint8
    extractor: str
    weights_path: str | None
    sha256: str
    cuda: bool = field(default_factory=torch.cuda.is_available)
    floors: dict = field(default_factory=dict, repr=False)  # floor(es, n) cache: n -> FD

    @property
    def reference_name(self) -> str:
        return f"{self.name}({self.reference.shape[0]})"


def digits_eval_set(weights_path: str | Path | None = None) -> EvalSet:
    register()
    path = Path(weights_path or digits_classifier.WEIGHTS)
    x = to_uint8(digits().x)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    half = len(x) // 2
    return EvalSet("digits-halfB", x[perm[:half]], x[perm[half:]], DIGITS_EXTRACTOR, str(path),
                   digits_classifier.sha256(path))


def inception_weights_path(setting: str | Path | None) -> str:
    """The local Inception weights file from the argument or $TCMLAB_INCEPTION_WEIGHTS; a missing one is an error."""
    path = setting or os.environ.get("TCMLAB_INCEPTION_WEIGHTS")
    if not path:
        raise FileNotFoundError(
            "no Inception weights: set inception_weights=... (or the environment variable TCMLAB_INCEPTION_WEIGHTS) to "
            "a local copy of torch-fidelity's weights-inception-2015-12-05-6726825d.pth; offline machines cannot "
            "download it")
    if not Path(path).is_file():
        raise FileNotFoundError(f"Inception weights file {path} (inception_weights / TCMLAB_INCEPTION_WEIGHTS) does "
                                f"not exist: copy {INCEPTION_FILE} there")
    sha = digits_classifier.sha256(path)
    if not sha.startswith(INCEPTION_SHA256_PREFIX):
        raise ValueError(f"Inception weights file {path} has SHA-256 {sha[:16]}…, not torch-fidelity's "
                         f"{INCEPTION_SHA256_PREFIX}…: it is not {INCEPTION_FILE} (or it is damaged). It was not "
                         f"loaded (loading unpickles it, which can run code). Copy the genuine file there.")
    return str(path)


def cifar10_eval_set(root: str | Path, inception_weights: str | Path | None = None, n_reference: int | None = None
                     ) -> EvalSet:
    """CIFAR-10 protocol: reference and dFID query = the training set (official code), Inception features."""
    path = inception_weights_path(inception_weights)
    x = cifar10(root).x[:n_reference]
    return EvalSet("cifar10-train", x, x, INCEPTION, path, digits_classifier.sha256(path))


def fid_kid(images: torch.Tensor, es: EvalSet, kid: bool = True, against: torch.Tensor | None = None) -> dict:
    """FID (and KID) of uint8 images against the eval set's reference, through torch-fidelity."""
    ref = es.reference if against is None else against
    n = min(len(images), len(ref))
    kw = dict(input1=U8Images(images), input2=U8Images(ref), fid=True, kid=kid, feature_extractor=es.extractor,
              feature_extractor_weights_path=es.weights_path, cuda=es.cuda, verbose=False, save_cpu_ram=True,
              batch_size=256, cache=False)
    if kid:
        kw["kid_subset_size"] = min(1000, max(2, n // 2))
    m = torch_fidelity.calculate_metrics(**kw)
    out = {"fid": float(m["frechet_inception_distance"])}
    if kid:
        out.update(kid_mean=float(m["kernel_inception_distance_mean"]), kid_std=float(m["kernel_inception_distance_std"]))
    return out


def floor_n(es: EvalSet, n: int | None) -> int:
    """The number of images a score over `n` query or generated images actually uses (n capped by the query)."""
    return len(es.query) if n is None else min(int(n), len(es.query))


def floor(es: EvalSet, n: int | None = None) -> float:
    """Real-vs-real FD at n: the first n query images against the reference, what a perfect model scores at this n.

    FD is biased upwards at small n (digits: ≈ 93 at n = 300, ≈ 35 at n = 898), so a score is only judged against
    the floor at its own n. Cached per n on the EvalSet."""
    n = floor_n(es, n)
    if n not in es.floors:
        es.floors[n] = fid_kid(es.query[:n], es, kid=False)["fid"]
    return es.floors[n]


@torch.no_grad()
def denoise(f, x: torch.Tensor, t: float, generator: torch.Generator | None = None, device=None,
            batch: int = 1024) -> torch.Tensor:
    """One-step denoising f(x + tε, t) of images x in [−1, 1] (TCM §2.2); ε is drawn on the CPU from `generator`,
    f runs on `device` (default: where its weights live)."""
    device = device_of(f) if device is None else torch.device(device)
    out = []
    for xb in x.split(batch):
        eps = torch.randn(xb.shape, generator=generator)
        xt = (xb + t * eps).to(device)
        out.append(f(xt, torch.full((xb.shape[0],), float(t), device=device)).cpu())
    return torch.cat(out)


def dfid(f, es: EvalSet, ts=DFID_TS, n: int | None = None, generator: torch.Generator | None = None, device=None,
         progress: bool = True, batch: int = 1024) -> dict[float, float]:
    """Denoising FID (TCM §2.2): {t: FID(f(x + tε, t) for real query x, reference)} for every t in ts."""
    x = es.query[:n].float() / 127.5 - 1
    scores = {}
    for t in tqdm(list(ts), desc="dFID_t", disable=not progress, leave=False):
        scores[float(t)] = fid_kid(to_uint8(denoise(f, x, t, generator, device, batch)), es, kid=False)["fid"]
    return scores


def dfid_card(es: EvalSet, t: float, n: int, weights: str, seed: int, step: int) -> EvalCard:
    return EvalCard("dfid", n, es.extractor, es.sha256, es.reference_name, (float(t),), weights, seed, step)


def dfid_callback(es: EvalSet, ts=DFID_TS, n: int | None = None, seed: int = 0, device=None):
    """An `eval_fn` for `train(...)`: logs {'dfid': {t: score}, 'n', 'floor'} to metrics.jsonl every `eval_every`
    steps; 'floor' is the real-vs-real FD at the same n (digits; None for CIFAR-10's train-vs-train protocol)."""
    def eval_fn(step, ema):
        g = torch.Generator().manual_seed(seed)
        scores = dfid(ema, es, ts, n, g, device=device, progress=False)
        return {"dfid": {str(t): v for t, v in scores.items()}, "n": floor_n(es, n), "floor": _floor_or_none(es, n),
                "extractor": es.extractor, "reference": es.reference_name}
    return eval_fn


def _floor_or_none(es: EvalSet, n: int | None) -> float | None:
    return floor(es, n) if es.extractor == DIGITS_EXTRACTOR else None


def sample_quality(model, es: EvalSet, t_mid: float = 1.0, n: int | None = None, seed: int = 0,
                   device=None, batch: int = 1024) -> list[dict]:
    """1-step and 2-step (T → t_mid) FID/KID of a `TrainedModel`, each with its eval card, and the floor at its n
    (`floor_n` = n, the number of generated images)."""
    n = n or len(es.query)
    fl = _floor_or_none(es, n)
    rows = []
    for ts in ((model.t_max,), (model.t_max, t_mid)):
        g = torch.Generator().manual_seed(seed)
        x = generate(model.f, n, model.shape, ts, device=device, generator=g, t_prime=model.t_prime, batch=batch)
        scores = fid_kid(to_uint8(x), es)
        card = EvalCard("fid", n, es.extractor, es.sha256, es.reference_name, ts, model.which, seed, model.step)
        rows.append({"card": asdict(card), **scores, "floor": fl, "floor_n": floor_n(es, n)})
    return rows
