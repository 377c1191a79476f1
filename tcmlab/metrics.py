"""Sample-quality metrics through torch-fidelity: FID/KID, the real-vs-real floor, denoising FID dFID_t (TCM §2.2),
and an eval card on every number.

Every score is measured against an `EvalSet` (`tcmlab.evalsets`: the digits halves and their CNN, CIFAR-10's
training set and Inception, the 2-D toy points); `eval_set(data)` there picks the one that matches a run's data.
FID is torch-fidelity's features and Fréchet distance (through a cached Σ^½ of the reference), KID its
`kid_features_to_metric`; the floor is the FD of n real query images against the reference, what a perfect model
scores at that n. `evaluate_run` is all of a trained model's scores with their cards (CLI `evaluate`, sweeps).
Protocol choices: docs/decisions.md §16.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset
from tqdm.auto import tqdm

from .evalsets import EvalSet
from .model import device_of
from .precond import T_MAX
from .precision import float32_math
from .samplers import check_t_mid, edm_times, generate, heun, one_and_two_step

DFID_GRID = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)  # dFID_t noise levels below T (TCM Fig. 2/3 span)


def dfid_ts(t_max: float = T_MAX) -> tuple[float, ...]:
    """The dFID_t grid of a model trained up to T = t_max: DFID_GRID below T, then T itself (dFID_T = 1-step FID)."""
    return tuple(t for t in DFID_GRID if t < t_max) + (float(t_max),)


def dfid_ts_for(t_max: float = T_MAX, t_prime: float | None = None) -> tuple[float, ...]:
    """The dFID_t levels of a model: `dfid_ts(t_max)`, then t′ (stage 2) if it is not on that grid. In this order,
    because `dfid` draws each level's noise in turn from one generator: the grid first gives every model of a
    sweep the same noise at every grid level, whatever its t′ (sorting t′ in would shift the draws above it)."""
    ts = dfid_ts(t_max)
    return ts if t_prime is None or float(t_prime) in ts else ts + (float(t_prime),)


DFID_TS = dfid_ts()


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

    metric: str  # 'fid' (consistency sampling) | 'fid_heun' (EDM's Heun sampler, stage 0) | 'dfid'
    n: int  # images scored
    extractor: str
    extractor_sha256: str
    reference: str  # e.g. 'digits-halfB(899)' or 'cifar10-train(50000)'
    steps: tuple[float, ...] = ()  # sampler times (80,) or (80, t_mid); Heun: EDM's grid; dFID: the noise level (t,)
    weights: str = "ema"  # 'ema' | 'raw'
    seed: int = 0
    step: int = -1  # training step of the checkpoint
    draws: int = 1  # noise draws seeded seed, seed + 1, …: the score is the mean of their FIDs, each at n

    def comparable_with(self, other: "EvalCard") -> list[str]:
        """Fields that differ (other than the checkpoint step); empty means comparable."""
        a, b = asdict(self), asdict(other)
        return [k for k in a if k != "step" and a[k] != b[k]]


def check_comparable(a: EvalCard, b: EvalCard) -> None:
    diff = a.comparable_with(b)
    if diff:
        raise ValueError(f"scores are not comparable: their eval cards differ in {', '.join(diff)}")


def energy_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Energy distance 2E‖X − Y‖ − E‖X − X′‖ − E‖Y − Y′‖ of two point sets (Székely): zero iff the distributions agree,
    sensitive to their whole shape, no bandwidth to choose. Within-set means exclude the zero diagonal."""
    def mean_dist(x, y, same):
        d = np.sqrt(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1))
        return d.sum() / (len(x) * (len(x) - 1)) if same else d.mean()
    return float(2 * mean_dist(a, b, False) - mean_dist(a, a, True) - mean_dist(b, b, True))


def _kid(a: np.ndarray, b: np.ndarray, subsets: int = 100, size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (unbiased MMD² with the cubic polynomial kernel (x·y/d + 1)³) over random subsets, as torch-fidelity."""
    rng = np.random.default_rng(seed)
    m = min(size, len(a), len(b))
    d = a.shape[1]
    vals = []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        vals.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


def features(images: torch.Tensor, es: EvalSet) -> torch.Tensor:
    """torch-fidelity features [N, D] of uint8 images at the extractor's FID/KID layer (the extractor is built once
    per EvalSet: its weights are loaded once, not per score)."""
    if es.feature_extractor is None:
        cls = torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY[es.extractor]
        layer = cls.get_default_feature_layer_for_metric("fid")
        es.feature_extractor = (create_feature_extractor(es.extractor, [layer], cuda=es.cuda, verbose=False,
                                                         feature_extractor_weights_path=es.weights_path), layer)
    fx, layer = es.feature_extractor
    fd = get_featuresdict_from_dataset(U8Images(images), fx, batch_size=256, cuda=es.cuda, save_cpu_ram=True,
                                       verbose=False)
    return fd[layer]


def reference_features(es: EvalSet) -> torch.Tensor:
    """The reference set's features, computed once per EvalSet and kept in memory (never a pickled disk cache):
    a dFID_t sweep over 10 noise levels extracts the 50k CIFAR-10 reference features once, not 10 times."""
    if es.reference_feats is None:
        es.reference_feats = features(es.reference, es)
    return es.reference_feats


def gaussian_stats(feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(μ, Σ, Σ^½) of features [N, D] in float64; Σ^½ from a symmetric eigendecomposition (eigenvalues clipped at 0)."""
    x = feats.double().cpu().numpy()
    mu, sigma = x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))
    w, v = np.linalg.eigh(sigma)
    return mu, sigma, (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, ref: tuple[np.ndarray, np.ndarray, np.ndarray]) -> float:
    """FID = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½, with tr (Σ1 Σ2)^½ = Σ √λ(Σ2^½ Σ1 Σ2^½): the same number as
    torch-fidelity's general eigenvalue route (tests/test_metrics.py), through one symmetric eigensolve against a
    cached Σ2^½, several times faster for 2048-d Inception features."""
    mu2, sigma2, sqrt2 = ref
    lam = np.linalg.eigvalsh(sqrt2 @ sigma1 @ sqrt2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(lam, 0, None)).sum())


def fid_kid(images: torch.Tensor, es: EvalSet, kid: bool = True, against: torch.Tensor | None = None) -> dict:
    """FID (and KID) of uint8 images against the eval set's reference, with torch-fidelity's extractor, statistics
    and metric functions (points: energy distance and KID of the raw coordinates)."""
    if es.points:
        ref = es.reference if against is None else against
        a, b = images.double().numpy(), ref.double().numpy()
        out = {"fid": energy_distance(a, b)}
        if kid:
            out["kid_mean"], out["kid_std"] = _kid(a, b)
        return out
    f1 = features(images, es)
    f2 = reference_features(es) if against is None else features(against, es)
    if against is None:
        if es.reference_stats is None:
            es.reference_stats = gaussian_stats(f2)
        ref = es.reference_stats
    else:
        ref = gaussian_stats(f2)
    x1 = f1.double().cpu().numpy()
    out = {"fid": frechet_distance(x1.mean(0), np.atleast_2d(np.cov(x1, rowvar=False)), ref)}
    if kid:
        m = kid_features_to_metric(f1, f2, kid_subset_size=min(1000, max(2, min(len(f1), len(f2)) // 2)),
                                   verbose=False)
        out.update(kid_mean=float(m["kernel_inception_distance_mean"]), kid_std=float(m["kernel_inception_distance_std"]))
    return out


class NonFiniteSamples(UserWarning):
    """Model outputs with non-finite values reached a score (counted in its 'nonfinite')."""


def count_nonfinite(x: torch.Tensor) -> int:
    """How many samples (rows) of x hold at least one non-finite value."""
    if x.shape[0] == 0:
        return 0
    return int((~torch.isfinite(x.detach())).reshape(x.shape[0], -1).any(1).sum())


def score(x: torch.Tensor, es: EvalSet, kid: bool = True, what: str = "samples") -> dict:
    """`fid_kid` of model output x as it is scored (`EvalSet.to_scored`), with 'nonfinite': how many of the samples
    hold a non-finite value. Those are scored as the official code scores them (quantised: NaN lands on a pixel value,
    ±inf on 255 / 0) and a `NonFiniteSamples` warning names the count: reported, never hidden (docs/decisions.md
    §20). A score with nonfinite > 0 is not the score of the model's finite outputs."""
    bad = count_nonfinite(x)
    if bad:
        warnings.warn(f"{bad} of {x.shape[0]} {what} hold non-finite values; they are scored as quantised pixels "
                      f"(the score records nonfinite={bad})", NonFiniteSamples, stacklevel=2)
    return {**fid_kid(es.to_scored(x), es, kid=kid), "nonfinite": bad}


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


def split_floors(es: EvalSet, splits: int = 8, seed: int = 0) -> list[float]:
    """Real-vs-real FD over `splits` random re-splits of the eval set's real images (query ∪ reference) into two
    disjoint halves of the query's and the reference's sizes: how far `floor` itself moves with the split, i.e. the
    sampling noise of FD at this n that no model can beat (digits, n = 898: see docs/decisions.md §16)."""
    if es.points or not es.disjoint:
        raise ValueError(f"split floors need disjoint real image halves (digits); {es.name} has none")
    real = torch.cat([es.query, es.reference])
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(splits):
        perm = torch.randperm(len(real), generator=g)
        a, b = real[perm[:len(es.query)]], real[perm[len(es.query):]]
        out.append(fid_kid(a, es, kid=False, against=b)["fid"])
    return out


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


def dfid_scores(f, es: EvalSet, ts=DFID_TS, n: int | None = None, generator: torch.Generator | None = None,
                device=None, progress: bool = True, batch: int = 1024) -> dict[float, dict]:
    """Denoising FID (TCM §2.2): {t: `score` of f(x + tε, t) for the real query x} for every t in ts, in the order
    of ts, each level's ε drawn in turn from `generator` (list a fixed grid first: `dfid_ts_for`)."""
    x = es.to_model(es.query[:n])
    return {float(t): score(denoise(f, x, t, generator, device, batch), es, kid=False, what=f"denoised at t={t:g}")
            for t in tqdm(list(ts), desc="dFID_t", disable=not progress, leave=False)}


def dfid(f, es: EvalSet, ts=DFID_TS, n: int | None = None, generator: torch.Generator | None = None, device=None,
         progress: bool = True, batch: int = 1024) -> dict[float, float]:
    """{t: dFID_t} of `dfid_scores` (non-finite outputs are warned about there)."""
    return {t: s["fid"] for t, s in dfid_scores(f, es, ts, n, generator, device, progress, batch).items()}


def dfid_card(es: EvalSet, t: float, n: int, weights: str, seed: int, step: int, draws: int = 1) -> EvalCard:
    return EvalCard("dfid", n, es.extractor, es.sha256, es.reference_name, (float(t),), weights, seed, step, draws)


def dfid_callback(es: EvalSet, ts=DFID_TS, n: int | None = None, seed: int = 0, device=None,
                  one_step: tuple[tuple[int, ...], float, float | None] | None = None):
    """An `eval_fn` for `train(...)`: logs {'dfid': {t: score}, 'n', 'floor'} to metrics.jsonl every `eval_every`
    steps; 'floor' is the real-vs-real FD at the same n (digits; None for CIFAR-10's train-vs-train protocol).
    one_step = (sample shape, T, t′ or None): also log 'fid_1step', the FID of n one-step samples from noise seeded
    `seed` (the generation side of the trade-off, TCM Fig. 2 and 3)."""
    def eval_fn(step, ema):
        g = torch.Generator().manual_seed(seed)
        scores = dict(sorted(dfid_scores(ema, es, ts, n, g, device=device, progress=False).items()))
        row = {"dfid": {str(t): v["fid"] for t, v in scores.items()}, "n": floor_n(es, n),
               "floor": _floor_or_none(es, n), "extractor": es.extractor, "reference": es.reference_name,
               "nonfinite": {str(t): v["nonfinite"] for t, v in scores.items()}}
        if one_step is not None:
            shape, t_max, t_prime = one_step
            x = generate(ema, floor_n(es, n), shape, (t_max,), device=device,
                         generator=torch.Generator().manual_seed(seed), t_prime=t_prime)
            s1 = score(x, es, kid=False, what="1-step samples")
            row["fid_1step"], row["nonfinite"]["1step"] = s1["fid"], s1["nonfinite"]
        return row
    return eval_fn


def _floor_or_none(es: EvalSet, n: int | None) -> float | None:
    return floor(es, n) if es.disjoint else None


def check_draws(draws) -> int:
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws (noise draws per score) must be an integer >= 1, got {draws!r}")
    return draws


def mean_over_draws(scores: list[dict]) -> dict:
    """One score from the `fid_kid` dicts of independent noise draws (docs/decisions.md §16): 'fid' is the mean over
    draws and 'fid_draws' every draw's FID (their spread is the evaluation noise of one draw: at n = 898 on digits
    the same model's 1-step FID spans ~50–120 over ten draws). KID, where scored, is draw 0's (kid_mean, and
    kid_std its spread over subsets): torch-fidelity's KID takes seconds a call, and draw 0 is the one-draw score.
    'nonfinite' (where every draw counted it, `score`): non-finite samples over all draws."""
    out = {"fid": float(np.mean([s["fid"] for s in scores])), "fid_draws": [s["fid"] for s in scores]}
    out.update({k: scores[0][k] for k in ("kid_mean", "kid_std") if k in scores[0]})
    if all("nonfinite" in s for s in scores):
        out["nonfinite"] = sum(s["nonfinite"] for s in scores)  # over all draws' samples
    return out


def sample_quality(model, es: EvalSet, t_mid: float = 1.0, n: int | None = None, seed: int = 0,
                   device=None, batch: int = 1024, draws: int = 1) -> list[dict]:
    """1-step and 2-step (T → t_mid) FID/KID of a `TrainedModel`, each with its eval card, and the floor at its n
    (`floor_n` = n, the number of generated images). draws > 1: the mean over that many noise draws (seeds seed,
    seed + 1, …; draw 0 is the one-draw score), each of n images scored against the same reference (`fid_draws`
    keeps every draw's FID)."""
    n = n or len(es.query)
    fl = _floor_or_none(es, n)
    by_ts = {}  # each draw scored as it is made: no draw's images are kept
    for k in range(check_draws(draws)):
        for ts, x in one_and_two_step(model, n, t_mid, seed + k, device, batch).items():
            by_ts.setdefault(ts, []).append(score(x, es, kid=k == 0, what=f"{len(ts)}-step samples"))
    rows = []
    for ts, per_draw in by_ts.items():
        scores = mean_over_draws(per_draw)
        card = EvalCard("fid", n, es.extractor, es.sha256, es.reference_name, ts, model.which, seed, model.step,
                        draws)
        rows.append({"card": asdict(card), **scores, "floor": fl, "floor_n": floor_n(es, n)})
    return rows


def heun_quality(model, es: EvalSet, num_steps: int = 18, n: int | None = None, seed: int = 0, device=None,
                 batch: int = 1024, draws: int = 1) -> dict:
    """FID/KID of a stage-0 (diffusion) `TrainedModel` sampled with EDM's Heun sampler on `edm_times(num_steps)`
    (2·num_steps − 1 network calls): the teacher's own quality, which a consistency model distilled or tuned from it
    is judged against. Same noise seed and draws convention as `sample_quality`; the card's metric is 'fid_heun'."""
    if model.cfg.stage != 0:
        raise ValueError(f"the Heun sampler needs a diffusion (stage-0) model, got a stage-{model.cfg.stage} run: a "
                         f"consistency model is sampled in 1 or 2 steps (`sample_quality`)")
    n = n or len(es.query)
    ts = edm_times(num_steps, t_max=model.t_max)
    scores = []
    for k in range(check_draws(draws)):
        x = generate(model.f, n, model.shape, ts.tolist(), device=device,
                     generator=torch.Generator().manual_seed(seed + k), batch=batch, sampler=heun)
        scores.append(score(x, es, kid=k == 0, what="Heun samples"))
    card = EvalCard("fid_heun", n, es.extractor, es.sha256, es.reference_name, tuple(ts.tolist()), model.which, seed,
                    model.step, draws)
    return {"card": asdict(card), **mean_over_draws(scores), "floor": _floor_or_none(es, n),
            "floor_n": floor_n(es, n)}


def evaluate_run(m, es, *, n: int | None = None, seed: int = 0, t_mid: float = 1.0, batch: int = 1024,
                 dfid: bool = True, device=None, progress: bool = False, heun_steps: int = 18,
                 draws: int = 1) -> list[dict]:
    """Rows with eval cards for a `TrainedModel`: 1- and 2-step FID/KID (`sample_quality`), then dFID_t at
    `dfid_ts(T)` and, for a stage-2 model, at t′ (noised after the grid, `dfid_ts_for`; rows in
    order of t); each row with the real-vs-real floor at its n and 'nonfinite', the samples with non-finite values
    among those scored (`score`). The 2-step sampler's t_mid is raised to t′ for a stage-2 model with
    t′ > t_mid (it is trained on [t′, T] only); the card's steps say which t_mid was used. A stage-0 (diffusion)
    model is sampled with EDM's Heun sampler on `heun_steps` times instead (`heun_quality`, card metric
    'fid_heun'): the teacher's own quality. Sweeps use EDM's 18.
    draws > 1: every score is the mean over that many noise draws (seeds seed, seed + 1, …; `mean_over_draws`);
    dFID_t's draw k noises the query with a generator seeded seed + k, as the one-draw score does with seed.
    Everything runs under the float32 flags of the run's own `train.precision` (TF32 off unless 'tf32'), as the
    dFID_t that train() logs does (docs/decisions.md §19); torch's flags are restored after."""
    check_t_mid(t_mid, m.t_max)  # before any scoring (the dFID pass alone takes minutes at n = 50k)
    with float32_math(m.cfg.train.precision, torch.backends.cudnn.benchmark):
        return _evaluate(m, es, n, seed, t_mid, batch, dfid, device, progress, heun_steps, draws)


def _evaluate(m, es, n, seed, t_mid, batch, dfid, device, progress, heun_steps, draws) -> list[dict]:
    if m.t_prime is not None:
        t_mid = max(t_mid, m.t_prime)

    per_t = {}
    if dfid:
        ts = dfid_ts_for(m.t_max, m.t_prime)  # the grid first: the same noise at every grid t for all t′
        for k in range(check_draws(draws)):
            g = torch.Generator().manual_seed(seed + k)
            d = dfid_scores(m.f, es, ts, n=n, generator=g, batch=batch, device=device, progress=progress)
            for t, v in d.items():
                per_t.setdefault(t, []).append(v)
    if m.cfg.stage == 0:
        rows = [heun_quality(m, es, heun_steps, n=n, seed=seed, device=device, batch=batch, draws=draws)]
    else:
        rows = sample_quality(m, es, t_mid=t_mid, n=n, seed=seed, batch=batch, device=device, draws=draws)
    n_q = floor_n(es, n)
    fl = floor(es, n_q) if es.disjoint else None  # CIFAR-10's train-vs-train protocol has no floor
    rows += [{"card": asdict(dfid_card(es, t, n_q, m.which, seed, m.step, draws)),
              **mean_over_draws(v), "floor": fl, "floor_n": n_q} for t, v in sorted(per_t.items())]
    return rows
