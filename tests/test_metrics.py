import importlib
import numpy as np
import json
import math

import pytest
import torch

from tcmlab import digits_classifier, evalsets, metrics
from tcmlab.metrics import EvalCard, check_comparable
from tcmlab.viz import to_uint8


@pytest.fixture(scope="module")
def es():
    return evalsets.digits_eval_set()


def test_shipped_extractor_loads_and_reproduces_its_card():
    card = (digits_classifier.WEIGHTS.with_suffix(".md")).read_text()
    assert digits_classifier.sha256(digits_classifier.WEIGHTS) in card
    acc = digits_classifier.accuracy(digits_classifier.load())
    assert f"{acc:.4f}" in card and acc > 0.95


def test_reregistering_is_harmless():
    evalsets.register()
    evalsets.register()
    importlib.reload(evalsets)  # a re-run notebook cell that imports and registers again
    evalsets.register()


def test_real_vs_itself_zero_vs_noise_large_and_floor(es):
    same = metrics.fid_kid(es.reference, es)
    assert abs(same["fid"]) < 1e-3 and "kid_mean" in same
    fl = metrics.floor(es)
    noise = metrics.fid_kid(torch.randint(0, 256, es.reference.shape, dtype=torch.uint8), es)
    assert 0 < fl < noise["fid"] / 5
    assert abs(same["kid_mean"]) < 0.05 * noise["kid_mean"]  # KID is unbiased: ≈ 0 (±) for identical sets


def test_dfid_of_identity_like_model_is_the_floor_at_tiny_t(es):
    identity = lambda x, t: x  # denoises nothing; at tiny t it returns the clean query half
    scores = metrics.dfid(identity, es, ts=(1e-4, 1.0), generator=torch.Generator().manual_seed(0), progress=False)
    fl = metrics.floor(es)
    assert scores[1e-4] == pytest.approx(fl, rel=0.02)
    assert scores[1.0] > 2 * fl


def test_floor_is_drawn_at_the_n_being_scored(es):
    # FD is biased by n: a perfect (identity) denoiser scored on 300 images sits at the floor *at n = 300*,
    # far above the floor at the full query half.
    identity = lambda x, t: x
    d300 = metrics.dfid(identity, es, ts=(1e-4,), n=300, generator=torch.Generator().manual_seed(0), progress=False)
    assert d300[1e-4] == pytest.approx(metrics.floor(es, 300), rel=0.02)
    assert metrics.floor(es, 300) > 2 * metrics.floor(es)
    assert metrics.floor(es) == metrics.floor(es, len(es.query)) and set(es.floors) == {300, len(es.query)}


def test_dfid_callback_rows_carry_n_and_the_floor_at_n(es):
    row = metrics.dfid_callback(es, ts=(1e-4,), n=300)(0, lambda x, t: x)
    assert row["n"] == 300 and row["floor"] == pytest.approx(metrics.floor(es, 300))
    assert row["dfid"]["0.0001"] == pytest.approx(row["floor"], rel=0.02)


def test_dfid_at_T_equals_one_step_fid(ci_runs, es):
    from tcmlab.model import load_model
    from tcmlab.samplers import generate
    m = load_model(ci_runs / "s1")
    d = metrics.dfid(m.f, es, ts=(80.0,), generator=torch.Generator().manual_seed(0), progress=False)[80.0]
    x = generate(m.f, len(es.query), m.shape, (80.0,), generator=torch.Generator().manual_seed(1))
    fid = metrics.fid_kid(to_uint8(x), es, kid=False)["fid"]
    assert d == pytest.approx(fid, rel=0.1)


def test_sample_quality_cards_and_comparison(ci_runs, es):
    from tcmlab.model import load_model
    rows1 = metrics.sample_quality(load_model(ci_runs / "s1"), es, n=200)
    rows2 = metrics.sample_quality(load_model(ci_runs / "s2"), es, n=200)
    assert [r["card"]["steps"] for r in rows1] == [(80.0,), (80.0, 1.0)]
    assert all(r["floor"] > 0 and r["fid"] > 0 and "kid_mean" in r for r in rows1)
    c1, c2 = EvalCard(**rows1[0]["card"]), EvalCard(**rows2[0]["card"])
    check_comparable(c1, c2)  # same protocol, different checkpoints: comparable
    with pytest.raises(ValueError, match="steps"):
        check_comparable(c1, EvalCard(**rows2[1]["card"]))
    with pytest.raises(ValueError, match="n"):
        check_comparable(c1, EvalCard(**{**rows2[0]["card"], "n": 50000}))


def test_split_floors_resplit_the_real_images(es, monkeypatch):
    """Each re-split scores two disjoint halves of all real digits; the seed fixes the splits; a split that puts the
    query and reference back as they are gives the floor itself."""
    a = metrics.split_floors(es, splits=3, seed=1)
    assert a == metrics.split_floors(es, splits=3, seed=1) and len(set(a)) == 3 and all(v > 0 for v in a)
    assert metrics.split_floors(es, splits=3, seed=2) != a
    same = evalsets.EvalSet(es.name, es.query, es.reference, es.extractor, es.weights_path, es.sha256)
    monkeypatch.setattr(metrics.torch, "randperm", lambda n, generator=None: torch.arange(n))  # the fixed split
    assert metrics.split_floors(same, splits=1) == [pytest.approx(metrics.floor(es))]


def test_scores_over_noise_draws(ci_runs, es):
    """draws = K: each score is the mean FID of K noise draws (seeds seed … seed + K − 1); draw 0 is the one-draw
    score, the card says K, and scores over different numbers of draws are not comparable."""
    from tcmlab.model import load_model
    m = load_model(ci_runs / "s1")
    one = metrics.sample_quality(m, es, n=100, seed=3)
    three = metrics.sample_quality(m, es, n=100, seed=3, draws=3)
    four = metrics.sample_quality(m, es, n=100, seed=4)
    for a, b, c in zip(one, three, four):
        assert b["card"]["draws"] == 3 and a["card"]["draws"] == 1 and len(b["fid_draws"]) == 3
        assert b["fid_draws"][0] == a["fid"] and b["fid_draws"][1] == c["fid"]  # draw k is seed + k
        assert b["fid"] == pytest.approx(np.mean(b["fid_draws"])) and len(set(b["fid_draws"])) == 3
        assert (b["kid_mean"], b["kid_std"]) == (a["kid_mean"], a["kid_std"])  # KID: draw 0's
        with pytest.raises(ValueError, match="draws"):
            check_comparable(EvalCard(**a["card"]), EvalCard(**b["card"]))
    heun = metrics.heun_quality(load_model(ci_runs / "s0"), es, num_steps=3, n=50, draws=2)
    assert heun["card"]["draws"] == 2 and heun["fid"] == pytest.approx(np.mean(heun["fid_draws"]))
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="draws"):
            metrics.sample_quality(m, es, n=20, draws=bad)


def test_dfid_callback_logs_to_metrics(tmp_path, ci_runs, es):
    from tcmlab.config import preset
    from tcmlab.train import train
    cb = metrics.dfid_callback(es, ts=(0.5, 80.0), n=100)
    train(preset("ci", 1, init_from=str(ci_runs / "s0")), tmp_path / "r", progress=False, eval_fn=cb, eval_every=10)
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20] and set(evals[0]["dfid"]) == {"0.5", "80.0"}


def test_inception_path_runs_offline_with_a_local_file(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as inc
    # Build a randomly initialised weights file without any download (numbers meaningless, plumbing real).
    monkeypatch.setattr(inc, "load_state_dict_from_url", lambda *a, **k: None)
    monkeypatch.setattr(inc.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    net = inc.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    monkeypatch.undo()
    path = tmp_path / "weights-inception.pth"
    torch.save(net.state_dict(), path)
    from tests.test_data import write_cifar
    write_cifar(tmp_path / "cifar", n=4)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torchhome"))
    with pytest.raises(ValueError, match="SHA-256"):  # not torch-fidelity's file: refused before unpickling
        evalsets.cifar10_eval_set(tmp_path / "cifar", inception_weights=path, n_reference=20)
    monkeypatch.setattr(evalsets, "INCEPTION_SHA256_PREFIX", digits_classifier.sha256(path)[:8])  # pretend genuine
    es = evalsets.cifar10_eval_set(tmp_path / "cifar", inception_weights=path, n_reference=20)
    es.cuda = False
    out = metrics.fid_kid(es.reference[:10], es, kid=False)
    assert math.isfinite(out["fid"])  # a finite number came back (fid == fid would pass for inf)
    assert not (tmp_path / "torchhome" / "fidelity_cache").exists()  # torch-fidelity's pickled cache is not used


class Marker:
    """A pickle payload that would create a file if unpickling ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_inception_weights_never_execute(tmp_path, monkeypatch):
    import pickle
    marker = tmp_path / "EXECUTED"
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    path.write_bytes(pickle.dumps({"x": Marker(marker)}))
    monkeypatch.setenv("TCMLAB_INCEPTION_WEIGHTS", str(path))
    monkeypatch.delenv("TCMLAB_INCEPTION_SHA256", raising=False)
    with pytest.raises(ValueError, match="not the expected 6726825d"):
        evalsets.cifar10_eval_set(tmp_path / "cifar")
    assert not marker.exists()
    # the hash check is a 32-bit prefix, which a crafted file can match: it must hold tensors only as well
    monkeypatch.setattr(evalsets, "INCEPTION_SHA256_PREFIX", digits_classifier.sha256(path)[:8])
    with pytest.raises(ValueError, match="holds objects other than tensors"):
        evalsets.cifar10_eval_set(tmp_path / "cifar")
    assert not marker.exists()


def test_inception_missing_weights_names_the_setting(tmp_path, monkeypatch):
    monkeypatch.delenv("TCMLAB_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="TCMLAB_INCEPTION_WEIGHTS"):
        evalsets.cifar10_eval_set(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evalsets.cifar10_eval_set(tmp_path, inception_weights=tmp_path / "nope.pth")


@pytest.mark.parametrize("n, d", [(50, 8), (300, 64), (20, 64)])  # n < d: singular covariances, as with few images
def test_frechet_distance_matches_torch_fidelity(n, d):
    # Parity with torch-fidelity's own FID formula (general eigenvalues of Σ1·Σ2) on the same features.
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n + 7, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64) * 0.3 + 0.2
    ref = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), False)
    ours = metrics.frechet_distance(a.numpy().mean(0), np.cov(a.numpy(), rowvar=False), metrics.gaussian_stats(b))
    assert ours == pytest.approx(ref["frechet_inception_distance"], rel=1e-6, abs=1e-8)


def test_nonfinite_outputs_are_counted_and_warned_not_hidden(es):
    # NaN/inf quantise to pixel values (the official code scores them so): the count must reach every score
    def broken(x, t):
        out = x.clone()
        out[:7] = float("nan")
        out[7:9, :, 0, 0] = float("inf")
        return out
    with pytest.warns(metrics.NonFiniteSamples, match="9 of 300 denoised at t=0.5"):
        d = metrics.dfid_scores(broken, es, ts=(0.5,), n=300, generator=torch.Generator().manual_seed(0),
                                progress=False)
    assert d[0.5]["nonfinite"] == 9 and math.isfinite(d[0.5]["fid"])
    with pytest.warns(metrics.NonFiniteSamples):
        row = metrics.dfid_callback(es, ts=(0.5,), n=300)(0, broken)
    assert row["nonfinite"] == {"0.5": 9}
    assert metrics.score(es.to_model(es.query[:50]), es, kid=False)["nonfinite"] == 0
    assert metrics.mean_over_draws([{"fid": 1.0, "nonfinite": 2}, {"fid": 3.0, "nonfinite": 1}])["nonfinite"] == 3
    assert "nonfinite" not in metrics.mean_over_draws([{"fid": 1.0}])  # a score that did not count says nothing


def test_dfid_noise_at_grid_levels_does_not_depend_on_t_prime(es):
    # dfid draws each level's noise in turn from one generator: t′ goes after the grid, so a stage-2 model at an
    # off-grid t′ is noised like stage 1 at every grid t (sorting t′ in shifted the draws of every larger t)
    assert metrics.dfid_ts_for(80.0, 0.8) == metrics.dfid_ts(80.0) + (0.8,)
    assert metrics.dfid_ts_for(80.0, 1.0) == metrics.dfid_ts(80.0)
    assert metrics.dfid_ts_for(10.0) == metrics.dfid_ts(10.0)
    seen = {}

    def record(tag):
        def f(x, t):
            seen.setdefault(tag, {})[round(float(t[0]), 6)] = x.clone()
            return x
        return f
    for tag, tp in (("stage1", None), ("stage2", 0.8)):
        metrics.dfid(record(tag), es, metrics.dfid_ts_for(80.0, tp), n=20, generator=torch.Generator().manual_seed(0),
                     progress=False)
    assert all(torch.equal(seen["stage1"][t], seen["stage2"][t]) for t in metrics.dfid_ts(80.0))


def test_retraining_the_digits_extractor_never_replaces_a_file_unasked(tmp_path, capsys):
    # every digits score and eval card depends on the shipped weights; a retrain is another extractor
    before = digits_classifier.WEIGHTS.read_bytes()
    with pytest.raises(SystemExit) as e:
        digits_classifier.main([])
    assert e.value.code == 2 and "--force" in capsys.readouterr().err
    assert digits_classifier.WEIGHTS.read_bytes() == before
    (tmp_path / "new.md").write_text("a card of another extractor\n")  # its card is kept as well
    with pytest.raises(SystemExit) as e:
        digits_classifier.main(["--out", str(tmp_path / "new.safetensors")])
    assert e.value.code == 2 and f"{tmp_path / 'new.md'} exists" in capsys.readouterr().err


def test_digits_classifier_refuses_an_output_it_cannot_write_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(digits_classifier, "train_classifier", lambda: pytest.fail("trained before checking --out"))
    (tmp_path / "w.safetensors").mkdir()
    for out in (tmp_path / "w.safetensors", "/proc/tcmlab/w.safetensors"):
        with pytest.raises(SystemExit):
            digits_classifier.main(["--out", str(out), "--force"])
        err = capsys.readouterr().err
        assert "is a folder" in err or "cannot write in" in err, err
