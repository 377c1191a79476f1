"""Evaluation sets: the real data a score is measured against, and the feature extractor that measures it.

Embedded digits: features from the shipped digits CNN (`tcmlab-digits-cnn`, see data/digits_cnn.md). The digits are
split into two fixed disjoint halves: the *reference* half B, and the *query* half A that dFID noises and denoises.
The floor FD(A, B) is what a perfect model would score at this n, so every digits FID is reported beside it.
CIFAR-10: torch-fidelity's `inception-v3-compat`, reference = the full training set (as the official code);
`inception_weights` (or $TCMLAB_INCEPTION_WEIGHTS) points to a local weights file so an offline machine never
downloads. torch-fidelity unpickles that file, so its SHA-256 is checked against torch-fidelity's published one
first (a prefix, from the file name) and the file must load with `torch.load(weights_only=True)` (tensors only);
torch-fidelity's on-disk statistics cache (also unpickled) is not used.
2-D toy data: two disjoint halves of a fresh sample, scored on the raw points.
The scores themselves are `tcmlab.metrics`; protocol choices: docs/decisions.md §16.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from . import digits_classifier
from .config import DataConfig
from .data import cifar10, digits, toy2d
from .viz import to_uint8

DIGITS_EXTRACTOR = "tcmlab-digits-cnn"
INCEPTION = "inception-v3-compat"
POINTS = "energy-distance-2d"  # toy2d: the 'fid' slot holds the energy distance of the raw points (and KID)
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's release asset
INCEPTION_SHA256_PREFIX = "6726825d"  # published in the file name (torch.hub's check_hash convention)


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


@dataclass
class EvalSet:
    """Real data for evaluation: `query` (noised and denoised by dFID) and `reference` (the target distribution).

    Images are uint8 and scored through torch-fidelity's extractor; 2-D points (toy2d) are float and scored by the
    energy distance (in the 'fid' slot: FD of a Gaussian fit would miss the shape of the moons) and KID of the raw
    coordinates (`extractor = POINTS`). `disjoint`: query and reference are
    disjoint real samples, so their distance is the real-vs-real floor."""

    name: str
    query: torch.Tensor
    reference: torch.Tensor
    extractor: str
    weights_path: str | None
    sha256: str
    disjoint: bool = True
    cuda: bool = field(default_factory=torch.cuda.is_available)
    floors: dict = field(default_factory=dict, repr=False)  # floor(es, n) cache: n -> FD
    feature_extractor: tuple | None = field(default=None, repr=False)  # (torch-fidelity extractor, layer), built once
    reference_feats: torch.Tensor | None = field(default=None, repr=False)  # reference features, computed once
    reference_stats: tuple | None = field(default=None, repr=False)  # (μ, Σ, Σ^½) of the reference features

    @property
    def reference_name(self) -> str:
        return f"{self.name}({self.reference.shape[0]})"

    @property
    def points(self) -> bool:
        return self.extractor == POINTS

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """Real data as the model sees it: images in [−1, 1]; points as they are."""
        return x if self.points else x.float() / 127.5 - 1

    def to_scored(self, x: torch.Tensor) -> torch.Tensor:
        """Model output as it is scored: uint8 images (the official quantisation); points as they are."""
        return x.detach().float().cpu() if self.points else to_uint8(x)


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
    expected = os.environ.get("TCMLAB_INCEPTION_SHA256") or INCEPTION_SHA256_PREFIX  # a port you verified yourself
    if not sha.startswith(expected):
        raise ValueError(f"Inception weights file {path} has SHA-256 {sha[:16]}…, not the expected {expected}… "
                         f"(torch-fidelity's {INCEPTION_FILE}, or $TCMLAB_INCEPTION_SHA256): it was not loaded "
                         f"(loading unpickles it, which can run code). Copy the genuine file there.")
    try:  # the hash is checked by a 32-bit prefix only: a file that holds anything but tensors is refused as well
        torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, KeyError) as e:
        raise ValueError(f"Inception weights file {path} does not load as tensors only ({type(e).__name__}): it holds "
                         f"objects other than tensors or is damaged, and was not loaded further (torch-fidelity "
                         f"unpickles it without restrictions, which can run code). Copy the genuine {INCEPTION_FILE} "
                         f"there.") from None
    return str(path)


def cifar10_eval_set(root: str | Path, inception_weights: str | Path | None = None, n_reference: int | None = None
                     ) -> EvalSet:
    """CIFAR-10 protocol: reference and dFID query = the training set (official code), Inception features."""
    path = inception_weights_path(inception_weights)
    x = cifar10(root).x[:n_reference]
    return EvalSet("cifar10-train", x, x, INCEPTION, path, digits_classifier.sha256(path), disjoint=False)


def toy2d_eval_set(toy: str = "moons", n: int = 4000) -> EvalSet:
    """2-D toy data: two disjoint halves of a fresh sample (seed 1; training uses seed 0), scored on raw points."""
    x = toy2d(toy, n=n, seed=1).x
    return EvalSet(f"toy2d-{toy}-halfB", x[: n // 2], x[n // 2:], POINTS, None, "")


def eval_set(data: DataConfig, data_root: str | Path | None = None,
             inception_weights: str | Path | None = None) -> EvalSet:
    """The evaluation set that matches a run's data: digits → digits CNN features, toy2d → raw 2-D points,
    CIFAR-10 → Inception on the training set. `data_root` (CIFAR-10) must come from the user, never from a
    checkpoint (paths stored in a checkpoint are shown, not followed)."""
    if data.name == "digits":
        return digits_eval_set()
    if data.name == "toy2d":
        return toy2d_eval_set(data.toy)
    if data.name == "cifar10":
        if not data_root:
            raise ValueError(f"CIFAR-10 evaluation needs the data folder: pass data_root (CLI: --data-root) — the "
                             f"run's config says {data.root!r}, which is not followed unless you pass it")
        return cifar10_eval_set(data_root, inception_weights)
    raise ValueError(f"no evaluation protocol for data {data.name!r}: evaluation covers digits, toy2d and cifar10")
