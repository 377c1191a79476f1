"""The claims report: its statistics, the verdict rules on tables built here, and that the README's claims block is
exactly what `python -m tcmlab claims` regenerates from the committed sweep tables."""

import math
import shutil
from pathlib import Path

import pytest

from tcmlab import claims
from tcmlab.__main__ import main
from tcmlab.claims import DOES_NOT, INCONCLUSIVE, NOT_RUN, REPRODUCES, Tables

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = {"s2.loss.t_prime": 1.0, "s2.loss.w_b": 0.1}
STAGE = {"stage1": 1, "control": 1, "stage2": 2}


def row(kind, seed, metric, value, t=None, step=None, **changed):
    """A results.csv / curves.csv row as read back from the CSV (strings)."""
    grid = {c: "" for c in DEFAULT}
    if kind == "stage2":
        grid.update({c: str(v) for c, v in DEFAULT.items()})
        grid.update({f"s2.loss.{k}": str(v) for k, v in changed.items()})
    r = {"point": f"seed{seed}/{kind}", "kind": kind, "stage": str(STAGE[kind]), "seed": str(seed), **grid,
         "metric": metric, "t": "" if t is None else str(t), "value": str(value), "n": "898",
         "floor": "34.8" if metric != "kid_1step" else ""}
    return r if step is None else {**r, "step": str(step)}


def test_interval_is_the_student_t_interval_of_the_mean():
    m, lo, hi = claims.interval([-3.0, -2.0, -4.0])
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} · s / √n with s = 1
    assert (m, lo, hi) == pytest.approx((-3.0, -3.0 - half, -3.0 + half))
    assert claims.interval([2.0])[1:] == (-math.inf, math.inf)


def test_verdict_rules():
    assert claims.directional([-3.0, -2.0, -4.0], -1) == REPRODUCES
    assert claims.directional([-3.0, -2.0, -4.0], +1) == DOES_NOT
    assert claims.directional([-3.0, 1.0, -4.0], -1) == INCONCLUSIVE
    assert claims.directional([], -1) == NOT_RUN
    # stable within ±15 % of a reference FID of 100: the whole interval inside ±15
    assert claims.stable([1.0, 2.0, 3.0], 100.0) == REPRODUCES
    assert claims.stable([30.0, 31.0, 29.0], 100.0) == DOES_NOT
    assert claims.stable([0.0, 20.0, -20.0], 100.0) == INCONCLUSIVE
    assert claims.combine([REPRODUCES, REPRODUCES]) == REPRODUCES
    assert claims.combine([REPRODUCES, INCONCLUSIVE]) == INCONCLUSIVE
    assert claims.combine([INCONCLUSIVE, DOES_NOT]) == DOES_NOT
    assert claims.combine([REPRODUCES, NOT_RUN]) == NOT_RUN


def _fig1b(gap):
    """Seeds far apart (offsets 0, 50, 100) with stage 2 `gap[s]` below the control within each seed."""
    rows = []
    for s, g in enumerate(gap):
        base = 100 + 50 * s
        for metric in ("fid_1step", "fid_2step"):
            rows += [row("stage1", s, metric, base + 20), row("control", s, metric, base),
                     row("stage2", s, metric, base - g)]
    return Tables(rows, [], [], DEFAULT)


def test_stage2_vs_control_pairs_by_seed():
    """The seeds' spread (±50) hides a 5-point gain unless the runs are paired by seed, as the verdict does."""
    assert _fig1b([5, 6, 4]).results and claims.stage2_vs_control(_fig1b([5, 6, 4])).verdict == REPRODUCES
    assert claims.stage2_vs_control(_fig1b([-5, -6, -4])).verdict == DOES_NOT
    assert claims.stage2_vs_control(_fig1b([5, -6, 4])).verdict == INCONCLUSIVE
    c = claims.stage2_vs_control(_fig1b([5, 6, 4]))
    assert c.rows[0][1:5] == ("170.0 ± 50.0", "150.0 ± 50.0", "145.0 ± 50.5", "-5.0 [-7.5, -2.5]")


def test_one_at_a_time_points_are_told_apart():
    """A stage-2 point is the defaults except the fields named: the w_b = 0.01 run is not read as the default run."""
    rows = []
    for s in range(3):
        rows += [row("stage2", s, "fid_1step", 90 + s), row("stage2", s, "fid_2step", 95 + s),
                 row("stage2", s, "fid_1step", 300 + 10 * s, w_b=0.01), row("stage2", s, "fid_2step", 310, w_b=0.01),
                 row("stage2", s, "fid_1step", 91 + s, w_b=1.0), row("stage2", s, "fid_2step", 96, w_b=1.0)]
    tb = Tables(rows, [], [], DEFAULT)
    assert tb.final("fid_1step", "stage2") == {0: 90.0, 1: 91.0, 2: 92.0}
    assert tb.final("fid_1step", "stage2", w_b=0.01) == {0: 300.0, 1: 310.0, 2: 320.0}
    assert tb.final("fid_1step", "stage2", t_prime=1, w_b=1) == {0: 91.0, 1: 92.0, 2: 93.0}  # 1 is the cell "1.0"
    stable, small = claims.boundary_strength(tb, [0.01, 0.1, 1.0], [], 0.1, None)
    assert small.verdict == REPRODUCES  # w_b = 0.01 much worse than 0.1
    assert stable.verdict == REPRODUCES  # w_b = 1 within ±15 % of the default
    assert [r[0] for r in small.rows] == ["w_b = 0.01", "w_b = 0.1", "w_b = 1"]


def test_stage1_over_training_compares_the_second_half():
    """dFID at t < 1 rising, at t > 1 and the 1-step FID falling between the first evaluation at or after half the
    run (step 1000 of 2000) and the last: reproduces; a falling dFID_0.5 makes it 'does not'."""
    def curves(low_slope):
        rows = []
        for s in range(3):
            for step in (500, 1000, 1500, 2000):
                rows += [row("stage1", s, "dfid", 50 + low_slope * step / 100 + s, t=0.5, step=step),
                         row("stage1", s, "dfid", 300 - step / 10 + s, t=5.0, step=step),
                         row("stage1", s, "fid_1step", 400 - step / 10 - s, step=step)]
        return Tables([], rows, [], DEFAULT)

    c = claims.stage1_over_training(curves(+1), 80.0)
    assert c.verdict == REPRODUCES and c.header[1:3] == ("step 1000", "step 2000")
    assert c.rows[0][1:3] == ("61.0 ± 1.0", "71.0 ± 1.0")
    assert claims.stage1_over_training(curves(-1), 80.0).verdict == DOES_NOT


def test_claims_without_a_sweep_says_what_to_run(tmp_path, capsys):
    assert main(["claims", str(ROOT / "sweeps" / "digits_claims.toml"), "--out", str(tmp_path)]) == 2
    assert "python -m tcmlab sweep" in capsys.readouterr().err


def test_readme_and_report_regenerate_from_the_committed_tables(tmp_path, monkeypatch):
    """Every number of the README's claims block and of docs/results/digits_claims.md comes from the committed sweep
    tables through `python -m tcmlab claims` (what `make results` runs after the sweep)."""
    monkeypatch.chdir(ROOT)  # the report names the spec by the path it was given
    tables = ROOT / "docs" / "results" / "digits_claims"
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    md = tmp_path / "digits_claims.md"
    assert main(["claims", "sweeps/digits_claims.toml", "--out", str(tables), "--md", str(md), "--readme",
                 str(readme), "--command", "make results"]) == 0
    committed = (ROOT / "docs" / "results" / "digits_claims.md").read_text()
    assert md.read_text() == committed.split("\n## Figures\n")[0].rstrip("\n") + "\n"
    assert readme.read_text().replace(str(md), "docs/results/digits_claims.md") == (ROOT / "README.md").read_text()
