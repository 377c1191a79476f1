"""The claims report: its statistics, the verdict rules on tables built here, and that the README's claims block is
exactly what `python -m tcmlab claims` regenerates from the committed sweep tables."""

import json
import math
import shutil
from pathlib import Path

import pytest

from tcmlab import claims
from tcmlab.__main__ import main
from tcmlab.claims import DOES_NOT, INCONCLUSIVE, NOT_RUN, REPRODUCES, Tables

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = {"s2.loss.t_prime": 1.0, "s2.loss.w_b": 0.1, "s2.loss.teacher_dropout": True}
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
    assert claims.combine([NOT_RUN, DOES_NOT]) == DOES_NOT  # a failed part is reported even when another is missing
    # "explodes": the increase's whole interval above the reference FID (at least a doubling)
    assert claims.explodes([210.0, 230.0, 220.0], 90.0) == REPRODUCES
    assert claims.explodes([5.0, 7.0, 6.0], 90.0) == DOES_NOT
    assert claims.explodes([50.0, 300.0, 20.0], 90.0) == INCONCLUSIVE


def test_non_finite_values_make_no_verdict_and_no_crash():
    """A diverged run's FID (nan or inf) gives an unbounded interval: inconclusive, shown as non-finite."""
    assert claims.directional([math.nan, -5.0, -6.0], -1) == INCONCLUSIVE
    assert claims.directional([math.inf, 5.0, 6.0], +1) == INCONCLUSIVE
    assert claims.mean_std([math.inf, 3.0, 4.0]) == "non-finite in 1 of 3"
    assert claims.diff_text([math.nan, 1.0]) == "non-finite (2 pairs)"
    assert claims.log_change([{0: 5.0}], [{0: 0.0}])[0] != claims.log_change([{0: 5.0}], [{0: 0.0}])[0]  # nan


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
    assert c.rows[0][1:5] == ("170.0 ± 50.0", "150.0 ± 50.0", "145.0 ± 50.5", "-5.0 [-7.5, -2.5] (n=3)")


def test_a_seed_missing_on_one_side_is_left_out_of_the_pairs():
    tb = _fig1b([5, 6, 4])
    tb.results = [r for r in tb.results if not (r["kind"] == "control" and r["seed"] == "2")]
    c = claims.stage2_vs_control(tb)
    assert c.rows[0][4].endswith("(n=2)") and c.rows[0][4].startswith("-5.5 ")


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
    assert tb.final("fid_1step", "stage2", teacher_dropout=False) == {}  # the cell "True" is not False
    assert tb.final("fid_1step", "stage2", teacher_dropout=True) == {0: 90.0, 1: 91.0, 2: 92.0}
    stable, small = claims.boundary_strength(tb, [0.01, 0.1, 1.0], [], 0.1, None)
    assert small.verdict == REPRODUCES  # w_b = 0.01 much worse than 0.1
    assert stable.verdict == REPRODUCES  # w_b = 1 within ±15 % of the default
    assert stable.name == "FID is stable over w_b ∈ [0.1, 1]"  # ρ was not varied: the claim does not name it
    assert claims.boundary_strength(tb, [0.01, 0.1], [], 0.1, None)[0].verdict == NOT_RUN  # nothing in the range
    assert [r[0] for r in small.rows] == ["w_b = 0.01 (outside the claimed range)", "w_b = 0.1", "w_b = 1"]


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


def _tradeoff(stage2_low, control_low):
    """Final evaluations: dFID at t = 0.5 (below t′ = 1) and t = 5, 1-step FID; stage 2 and the control change them
    by the factors given per seed (low level), −10 % / −5 % (t = 5), −8 % / −4 % (1-step)."""
    rows = []
    for s in range(3):
        rows += [row("stage1", s, "dfid", 40 + s, t=0.5), row("stage1", s, "dfid", 100 + s, t=5.0),
                 row("stage1", s, "fid_1step", 120 + 3 * s)]
        for kind, low, high, one in (("stage2", stage2_low[s], 0.90 - 0.01 * s, 0.92 + 0.01 * s),
                                     ("control", control_low[s], 0.95 - 0.01 * s, 0.96 + 0.01 * s)):
            rows += [row(kind, s, "dfid", (40 + s) * low, t=0.5), row(kind, s, "dfid", (100 + s) * high, t=5.0),
                     row(kind, s, "fid_1step", (120 + 3 * s) * one)]
    return Tables(rows, [], [], DEFAULT)


def test_stage2_tradeoff_rises_below_tprime_faster_than_the_control():
    c = claims.stage2_tradeoff(_tradeoff([1.5, 1.6, 1.4], [1.1, 1.08, 1.12]), 1.0, 80.0)
    assert c.verdict == REPRODUCES and [r[-1] for r in c.rows[-4:]] == [REPRODUCES] * 4
    assert c.rows[-4][2].startswith("×1.50 [")
    slower = claims.stage2_tradeoff(_tradeoff([1.1, 1.08, 1.12], [1.5, 1.6, 1.4]), 1.0, 80.0)
    assert [r[-1] for r in slower.rows[-4:]] == [REPRODUCES, REPRODUCES, REPRODUCES, DOES_NOT]
    assert slower.verdict == DOES_NOT


def test_best_setting_judges_only_the_values_the_paper_tried():
    """TCM Table 3 tried t′ ∈ {0.17, 0.8, 1, 1.5}: t′ = 0.5 beating t′ = 1 is shown but does not decide."""
    rows = []
    for s in range(3):
        for tp, fid in ((0.5, 80), (0.8, 95), (1.0, 90), (1.5, 97), (0.17, 99)):
            rows += [row("stage2", s, "fid_1step", fid + s * (1 + tp), t_prime=tp),
                     row("stage2", s, "fid_2step", fid, t_prime=tp)]
    tb = Tables(rows, [], [], DEFAULT)
    values = [0.17, 0.5, 0.8, 1.0, 1.5]
    c = claims.best_setting(tb, "t′", "Table 3", "t_prime", values, 1.0, claims.TABLE3_T_PRIMES)
    assert c.verdict == REPRODUCES and "(not in the paper's table)" in c.rows[1][0]
    every = claims.best_setting(tb, "t′", "Table 3", "t_prime", values, 1.0)  # all values judged
    assert every.verdict == DOES_NOT and "lowest mean 1-step FID: 0.5 (-10.5 against the reference)" in every.reading
    # a t′ above t_mid samples its 2-step FID through t′ (the eval card says so): the table says it too
    for r in tb.results:
        if r["metric"] == "fid_2step":
            r["card"] = json.dumps({"steps": [80.0, max(1.0, float(r["s2.loss.t_prime"]))]})
    c = claims.best_setting(tb, "t′", "Table 3", "t_prime", values, 1.0, claims.TABLE3_T_PRIMES)
    assert [r[2] for r in c.rows][3:] == ["90.0 ± 0.0", "97.0 ± 0.0 (via t = 1.5)"]


def test_claims_without_a_sweep_says_what_to_run(tmp_path, capsys):
    assert main(["claims", str(ROOT / "sweeps" / "digits_claims.toml"), "--out", str(tmp_path)]) == 2
    assert "python -m tcmlab sweep" in capsys.readouterr().err


def test_a_stage1_grid_is_read_one_value_at_a_time(tmp_path, capsys):
    """A sweep whose stage 1 has a grid (digits_teacher: ECT's d) has one chain per seed and value: the claims need
    --where to pick one (refused without, naming the column), and then read only that value's rows (stage 0 kept)."""
    from tcmlab.sweep import load_spec
    from tcmlab.sweep_table import write_csv
    spec = tmp_path / "s.toml"
    spec.write_text('preset = "ci"\nseeds = [0, 1, 2]\ncontrol = true\n[stage1]\ngrid = { "loss.d" = [5, 10] }\n')
    rows = []
    for seed in range(3):
        for d, gain in ((5, 6.0), (10, -6.0)):  # stage 2 beats the control at d = 5 only
            for kind, v in (("stage1", 100.0), ("control", 90.0 + seed), ("stage2", 90.0 + seed - gain)):
                for metric in ("fid_1step", "fid_2step"):
                    rows.append({"point": f"seed{seed}/{kind}{d}", "kind": kind, "stage": str(STAGE[kind]),
                                 "seed": str(seed), "s1.loss.d": str(d), "metric": metric, "t": "",
                                 "value": str(v), "n": "898", "floor": "34.8"})
        rows.append({"point": f"seed{seed}/s0", "kind": "stage0", "stage": "0", "seed": str(seed), "s1.loss.d": "",
                     "metric": "fid_heun", "t": "", "value": "30", "n": "898", "floor": "34.8"})
    write_csv(tmp_path / "results.csv", rows)
    assert main(["claims", str(spec), "--out", str(tmp_path)]) == 2
    assert "--where s1.loss.d=VALUE" in capsys.readouterr().err
    assert main(["claims", str(spec), "--out", str(tmp_path), "--where", "s2.loss.w_b=1"]) == 2
    assert "not a stage-0/1 grid column" in capsys.readouterr().err
    verdicts = {}
    for d in (5, 10):
        tb, found = claims.report(load_spec(spec), tmp_path, {"s1.loss.d": d})
        assert {r["s1.loss.d"] for r in tb.results} == {str(d), ""}
        verdicts[d] = found[0].verdict
    assert verdicts == {5: REPRODUCES, 10: DOES_NOT}
    assert main(["claims", str(spec), "--out", str(tmp_path), "--where", "s1.loss.d=5"]) == 0
    assert "(preset `ci`, s1.loss.d = 5)" in capsys.readouterr().out
    assert main(["claims", str(spec), "--out", str(tmp_path), "--where", "s1.loss.d=25"]) == 2  # a typo: no rows
    assert "--where s1.loss.d=25: no row of" in capsys.readouterr().err
    # a grid field with one value leaves nothing to pick: no --where needed
    spec.write_text(spec.read_text().replace("[5, 10]", "[5]"))
    assert main(["claims", str(spec), "--out", str(tmp_path)]) == 0
    tb, _ = claims.report(load_spec(spec), tmp_path)  # and the rows of another d (an earlier spec) are not read
    assert {r["s1.loss.d"] for r in tb.results} == {"5", ""}


@pytest.mark.parametrize("sweep, where", [("digits_claims", []), ("digits_long", []),
                                          ("digits_teacher", ["--where", "s1.loss.d=250"]), ("digits_fast", [])])
def test_readme_and_report_regenerate_from_the_committed_tables(sweep, where, tmp_path, monkeypatch):
    """Every number of the README's claims blocks and of docs/results/<sweep>.md comes from the committed sweep
    tables through `python -m tcmlab claims` (what `make results` runs after each sweep)."""
    monkeypatch.chdir(ROOT)  # the report names the spec by the path it was given
    tables = ROOT / "docs" / "results" / sweep
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    md = tmp_path / f"{sweep}.md"
    assert main(["claims", f"sweeps/{sweep}.toml", "--out", str(tables), "--md", str(md), "--readme",
                 str(readme), "--command", "make results", *where]) == 0
    committed = (ROOT / "docs" / "results" / f"{sweep}.md").read_text()
    assert md.read_text() == committed.split("\n## Figures\n")[0].rstrip("\n") + "\n"
    assert readme.read_text().replace(str(md), f"docs/results/{sweep}.md") == (ROOT / "README.md").read_text()


def test_report_figures_have_titled_axes_and_the_sweep_points():
    from tcmlab import claims_plots

    rows, curves = [], []
    for s in range(2):
        for kind in ("stage1", "control"):
            rows += [row(kind, s, "fid_1step", 100 + s), row(kind, s, "fid_2step", 90), row(kind, s, "dfid", 40, t=0.5)]
        for tp in (0.5, 1.0, 1.5):
            rows += [row("stage2", s, "fid_1step", 80 + tp + s, t_prime=tp),
                     row("stage2", s, "fid_2step", 85, t_prime=tp), row("stage2", s, "dfid", 45, t=0.5, t_prime=tp)]
        for step in (500, 1000):
            curves += [row("stage1", s, "fid_1step", 200 - step / 10, step=step),
                       row("stage1", s, "dfid", 40, t=0.5, step=step),
                       row("stage2", s, "fid_1step", 90, step=step), row("stage2", s, "dfid", 44, t=0.5, step=step)]
    tb = Tables(rows, curves, [], DEFAULT)
    figs, skipped = claims_plots.all_figures(tb, {"t_prime": [0.5, 1.0, 1.5], "w_b": [0.1]})
    assert not skipped and set(figs) == {"dfid_profile", "stage1_training", "stage2_training", "tprime", "ablations"}
    for name, fig in figs.items():
        assert fig.layout.title.text and fig.layout.xaxis.title.text and fig.layout.yaxis.title.text, name
    assert list(figs["tprime"].data[0].x) == [0.5, 1.0, 1.5] and list(figs["tprime"].data[0].y) == [81.0, 81.5, 82.0]
    assert list(figs["stage2_training"].data[0].x) == [0, 500, 1000]  # step 0 = the end of stage 1
    # ... read off stage 1's curve (one draw, as the rest of the curve), not its final score (a mean over draws)
    assert figs["stage2_training"].data[0].y[0] == 100.0
    # without stage-1 curves: its final score, and the trace says so (not a silently missing step 0)
    no_s1 = Tables(rows, [c for c in curves if c["kind"] != "stage1"], [], DEFAULT)
    trace = claims_plots.over_training(no_s1, "stage2", "t", start="stage1").data[0]
    assert list(trace.x) == [0, 500, 1000] and trace.y[0] == 100.5 and "stage 1's final score" in trace.name
    assert [b for b in figs["ablations"].data[0].x] == ["stage 1", "control", "defaults", "t_prime = 0.5",
                                                        "t_prime = 1.5"]


def test_a_sweep_without_curves_gets_no_empty_figures_over_training():
    """digits_fast sets no `[eval] every`: its report has the final-score figures only, not blank ones over training."""
    from tcmlab import claims_plots

    rows = [row(kind, s, m, v) for s in range(2) for kind, v in (("stage1", 100), ("control", 95), ("stage2", 90))
            for m in ("fid_1step", "fid_2step")] + [row("stage1", s, "dfid", 40, t=0.5) for s in range(2)]
    figs, skipped = claims_plots.all_figures(Tables(rows, [], [], DEFAULT), {})
    assert set(figs) == {"dfid_profile", "ablations"} and set(skipped) == {"stage1_training", "stage2_training"}


def test_figures_without_rows_to_plot_are_named_not_drawn():
    # a sweep evaluated without dFID (or only stage 0 so far): claims --figures must not crash on an empty frame
    from tcmlab import claims_plots

    assert claims_plots.all_figures(Tables([], [], [], DEFAULT), {"t_prime": [0.5, 1.0]}) == (
        {}, {"dfid_profile": "no final dFID_t rows of stage 1 in results.csv",
             "stage1_training": "no curves.csv rows (the spec sets no [eval] every)",
             "stage2_training": "no curves.csv rows (the spec sets no [eval] every)",
             "tprime": "no stage-2 1-step FID rows at the grid's t′ values",
             "ablations": "no 1-step FID rows of stage 1, the control or stage 2"})
    rows = [row("stage1", s, "fid_1step", 100) for s in range(2)]  # no dFID, no stage 2
    figs, skipped = claims_plots.all_figures(Tables(rows, [], [], DEFAULT), {"t_prime": [0.5, 1.0]})
    assert set(figs) == {"ablations"} and list(figs["ablations"].data[0].x) == ["stage 1"]
    assert set(skipped) == {"dfid_profile", "stage1_training", "stage2_training", "tprime"}
    curves = [row("stage1", s, "fid_1step", 100, step=500) for s in range(2)]  # no stage-2 curves (yet)
    figs, skipped = claims_plots.all_figures(Tables(rows, curves, [], DEFAULT), {})
    assert "stage1_training" in figs and skipped["stage2_training"] == "no stage2 rows in curves.csv"


def test_each_spec_replaces_only_its_own_readme_block():
    a0, a1 = claims.markers("sweeps/digits_claims.toml")
    b0, b1 = claims.markers("sweeps/digits_long.toml")
    text = f"intro\n{a0}\nold a\n{a1}\nmiddle\n{b0}\nold b\n{b1}\nend\n"
    new = claims.replace_block(text, "new b", "sweeps/digits_long.toml")
    assert new == f"intro\n{a0}\nold a\n{a1}\nmiddle\n{b0}\nnew b\n{b1}\nend\n"
    with pytest.raises(ValueError, match="no claims block for sweeps/ci.toml"):
        claims.replace_block(text, "x", "sweeps/ci.toml")


RECIPE_QUOTES = {  # sweep -> the summary.csv rows docs/results/digits_recipe.md quotes: (kind, metric, grid values)
    "digits_claims": [("stage0", "fid_heun", {}), ("stage1", "fid_1step", {}), ("stage1", "fid_2step", {})],
    "digits_fast": [("stage0", "fid_heun", {})] + [(k, m, {}) for k in ("stage1", "control", "stage2")
                                                   for m in ("fid_1step", "fid_2step")],
    "digits_teacher": [("stage0", "fid_heun", {})] + [(k, m, {"s1.loss.d": d}) for k in ("stage1", "control", "stage2")
                                                      for d in ("500", "250") for m in ("fid_1step", "fid_2step")],
}
RECIPE_QUOTES["digits_fast_T80"] = RECIPE_QUOTES["digits_fast"]  # T = 80, stages 1 and 2 of 3,000 and 1,000 steps


@pytest.mark.parametrize("doc", ["README.md", "docs/results/digits_recipe.md"])
def test_every_tagged_number_is_a_row_of_its_committed_table(doc):
    """Every "mean ± std (sweep[, field = value])" in the README and the recipe page is the mean ± std of a row of
    docs/results/<sweep>/summary.csv with those grid values: a number left behind when a table changes fails here."""
    import csv
    import re

    text = " ".join((ROOT / doc).read_text().split())
    quotes = re.findall(r"(\d+\.\d) ± (\d+\.\d) \((digits_\w+)((?:, \w+ = [^,)]+)*)\)", text)
    assert quotes, doc
    for mean, std, sweep, grid in quotes:
        with open(ROOT / "docs" / "results" / sweep / "summary.csv") as fh:
            summary = list(csv.DictReader(fh))
        want = [kv.split(" = ") for kv in grid.split(", ")[1:]]
        assert any(f"{float(r['mean']):.1f}" == mean and f"{float(r['std']):.1f}" == std
                   and all(any(c.split(".")[-1] == k and r[c] == v for c in r) for k, v in want)
                   for r in summary), f"{doc}: {mean} ± {std} ({sweep}{grid}) is no row of {sweep}/summary.csv"


@pytest.mark.parametrize("sweep", sorted(RECIPE_QUOTES))
def test_recipe_page_quotes_the_committed_sweep_tables(sweep):
    """The recipe page's numbers are the committed summary.csv's mean ± std over all of the spec's seeds (written by
    `make results`), each followed by its sweep and grid point, e.g. "76.2 ± 8.5 (digits_teacher, d = 250)", so they
    cannot drift from the tables."""
    import csv

    from tcmlab.sweep import load_spec

    seeds = len(load_spec(ROOT / "sweeps" / f"{sweep}.toml").seeds)
    page = " ".join((ROOT / "docs" / "results" / "digits_recipe.md").read_text().split())
    with open(ROOT / "docs" / "results" / sweep / "summary.csv") as fh:
        summary = list(csv.DictReader(fh))
    for kind, metric, grid in RECIPE_QUOTES[sweep]:
        (r,) = [r for r in summary if r["kind"] == kind and r["metric"] == metric
                and all(r[c] == v for c, v in grid.items())]
        label = sweep + "".join(f", {c.split('.')[-1]} = {v}" for c, v in grid.items())
        quote = f"{float(r['mean']):.1f} ± {float(r['std']):.1f} ({label})"
        assert int(r["count"]) == seeds and quote in page, quote


def test_a_spec_without_stage_2_is_named_and_top_level_grid_fields_are_read(tmp_path, capsys):
    from tcmlab.sweep import load_spec
    spec = tmp_path / "s.toml"
    spec.write_text('preset = "ci"\nstages = [0, 1]\n')
    assert main(["claims", str(spec), "--out", str(tmp_path)]) == 2
    assert "has no stage 2 (its stages: 0, 1)" in capsys.readouterr().err
    spec.write_text('preset = "ci"\n[stage2]\ngrid = { "from_scratch" = [true, false], "loss.w_b" = [0.1, 1] }\n')
    assert claims.defaults(load_spec(spec)) == {"s2.from_scratch": False, "s2.loss.w_b": 0.1}


def test_a_damaged_table_is_an_error_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    """An empty, cut or garbled results.csv (a full disk, `head -c`) must not read as a sweep whose points were not
    run: claims names the file (line, column) and the command that rebuilds it, and writes no report, README block
    or figure. A table that lacks a point's rows whole still reports it as not run."""
    from tcmlab.sweep import load_spec
    monkeypatch.chdir(ROOT)
    good = (ROOT / "docs" / "results" / "digits_claims" / "results.csv").read_text()
    lines = good.splitlines(keepends=True)
    head, row, tail = "".join(lines[:4]), lines[4].split(","), "".join(lines[5:])
    cases = {"": "results.csv is empty", lines[0]: "results.csv has a header but no rows",
             good[:3000]: "results.csv ends mid-row (cut short",
             head + ",".join(row[:5]) + "\n": "results.csv line 5: 5 fields where the header has 21 columns",
             head + ",".join(row[:13] + ["abc"] + row[14:]) + tail: "line 5: column value = 'abc' is not a number"}
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    for text, message in cases.items():
        (tmp_path / "t").mkdir(exist_ok=True)
        (tmp_path / "t" / "results.csv").write_text(text)
        args = ["claims", "sweeps/digits_claims.toml", "--out", str(tmp_path / "t"), "--md", str(tmp_path / "r.md"),
                "--readme", str(readme), "--figures", str(tmp_path / "figs")]
        assert main(args) == 2, message
        err = capsys.readouterr().err
        assert message in err and "sweep sweeps/digits_claims.toml --out " in err and "--report-only" in err, err
        assert not (tmp_path / "r.md").exists() and not (tmp_path / "figs").exists()
        assert readme.read_text() == (ROOT / "README.md").read_text()
    (tmp_path / "t" / "results.csv").write_text("".join(r for r in lines if ",control," not in r))  # no control yet
    _, found = claims.report(load_spec("sweeps/digits_claims.toml"), tmp_path / "t")
    assert found[0].verdict == NOT_RUN
