import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NB = Path(__file__).resolve().parents[1] / "notebooks"
PAPERMILL = [sys.executable, "-m", "papermill"]


def committed_notebooks() -> list[Path]:
    """The notebooks git tracks (not the executed out*.ipynb copies the README's papermill commands write here)."""
    try:
        names = subprocess.run(["git", "ls-files", "*.ipynb"], cwd=NB, capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the numbered notebooks
        names = [p.name for p in NB.glob("[0-9]*.ipynb")]
    return sorted(NB / name for name in names)


def test_notebooks_are_committed_stripped_with_a_parameters_cell():
    assert len(committed_notebooks()) == 4
    for path in committed_notebooks():
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(c["execution_count"] is None and not c["outputs"] for c in code), path.name
        assert "parameters" in code[0]["metadata"].get("tags", []), path.name
        assert 'preset = "ci"' in "".join(code[0]["source"]), path.name


def run_card(tmp_path, *params):
    env = {**__import__("os").environ, "TCMLAB_NB_OUT": str(tmp_path / "runs")}
    return subprocess.run(PAPERMILL + ["02_truncated_training.ipynb", str(tmp_path / "out.ipynb"), *params,
                                       "--no-progress-bar"], cwd=NB, env=env, capture_output=True, text=True)


def test_card_command_works_verbatim_with_an_int_tprime(tmp_path):
    r = run_card(tmp_path, "-p", "tprime", "1")  # papermill passes `-p tprime 1` as an int
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "out.ipynb").read_text())
    text = json.dumps(out)
    assert "no stage-1 run given or found" in text  # standalone on a fresh checkout: trained the small stage 1
    assert (tmp_path / "runs" / "stage2-tp1-wb0.1-rho0.25-s0.2-nu0.01" / "samples_2step.png").exists()


def test_card_command_rejects_tprime_out_of_range(tmp_path):
    r = run_card(tmp_path, "-p", "tprime", "200")
    assert r.returncode != 0
    assert "tprime (loss.t_prime) must be in (0, T=80), got 200" in r.stderr + r.stdout


def test_boolean_parameters_are_parsed_strictly():
    from tcmlab import nbparams
    assert nbparams.as_bool("teacher_dropout", "false") is False  # bool("false") would be True
    assert nbparams.as_bool("teacher_dropout", "True") is True and nbparams.as_bool("x", 0) is False
    for bad in ("maybe", 2, None, 0.5):
        with pytest.raises(ValueError, match="teacher_dropout must be true or false"):
            nbparams.as_bool("teacher_dropout", bad)
    cfg = nbparams.stage2_config("ci", "runs/s1", 1, 0.1, 0.25, 0.2, 0.01, teacher_dropout="false")
    assert cfg.loss.teacher_dropout is False


def test_draws_parameter_takes_the_presets_default_at_zero():
    from tcmlab import nbparams
    assert nbparams.draws_setting("digits", 0) == 10 and nbparams.draws_setting("ci", 0) == 1
    assert nbparams.draws_setting("ci", 3) == 3
    with pytest.raises(ValueError, match="draws must be a positive integer"):
        nbparams.draws_setting("digits", -2)


def test_explorer_plots_the_dirac_mass_from_w_b_not_rho():
    # TCM Eq. (7)/(10): λ_b = w_b/(1 + w_b); ρ is the batch share at t′, not the mass.
    from tcmlab import plots
    fig = plots.psi_figure(1.0, 0.2, 0.01, rho=0.25, w_b=0.1)
    spike = fig.data[2]
    assert max(spike.y) == pytest.approx(0.1 / 1.1) and "ρ = 0.25" in spike.name
    assert max(plots.psi_figure(1.0, 0.2, 0.01, rho=0.5, w_b=1.0).data[2].y) == pytest.approx(0.5)
    assert max(plots.psi_figure(1.0, 0.2, 0.01, rho=0.1, w_b=1.0).data[2].y) == pytest.approx(0.5)


def test_the_psi_curve_jumps_at_t_prime_and_names_T():
    # ψ̄ is 0 below t′ and peaks at t′: the grid holds t′ (a ramp drawn from the grid point below it would show
    # density below t′ and a peak too low)
    import numpy as np

    from tcmlab import plots
    from tcmlab.schedules import TruncatedLogStudentT
    fig = plots.psi_figure(1.3, 0.2, 0.01, rho=0.25, w_b=0.1, t_max=10.0)
    x, y = np.asarray(fig.data[1].x), np.asarray(fig.data[1].y)
    peak = 1.3 * float(TruncatedLogStudentT(1.3, 10.0, 0.2, 0.01).pdf(np.array([1.3]))[0]) / 1.1
    assert y.max() == pytest.approx(peak) and y[x < 1.3].max() == 0 and "T=10" in fig.layout.title.text


def test_code_cites_decisions_that_exist():
    import re
    root = Path(__file__).resolve().parents[1]
    decisions = (root / "docs" / "decisions.md").read_text()
    sections = set(re.findall(r"^## §(\d+)", decisions, re.M))
    files = [p for p in (root / "tcmlab").rglob("*.py")] + list((root / "tests").glob("*.py"))
    for path in files:
        text = path.read_text()
        if path.name != "test_notebooks.py":
            assert not re.search(r"SPEC\.md|SPEC\s*§|reference-code\.md", text), f"{path} cites a document outside the repo"
        for cited in re.findall(r"decisions(?:\.md)? (§[\d–, §]+)", text):
            for n in re.findall(r"\d+", cited):
                assert n in sections, f"{path} cites docs/decisions.md §{n}, which does not exist"


def papermill(tmp_path, notebook, *params, env_extra=None, timeout=900):
    env = {**__import__("os").environ, "TCMLAB_NB_OUT": str(tmp_path / "runs"), **(env_extra or {})}
    args = [a for k, v in params for a in ("-p", k, str(v))]
    r = subprocess.run(PAPERMILL + [notebook, str(tmp_path / f"out-{notebook}"), *args, "--no-progress-bar"],
                       cwd=NB, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return json.loads((tmp_path / f"out-{notebook}").read_text())


PLOTLY = "application/vnd.plotly.v1+json"
WIDGET = "application/vnd.jupyter.widget-view+json"


def outputs(nb):
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]]


def check_saved_outputs(nb) -> list[dict]:
    """What a papermill output shows when opened without a kernel: no widget reprs, progress lines that finished,
    figures with a PNG copy (where kaleido has a Chromium), titled axes, annotations inside their log axes' range.
    Returns the figures."""
    figures = []
    for o in outputs(nb):
        data = o.get("data", {})
        text = "".join(data.get("text/plain", ""))
        assert not text.startswith(("FigureWidget(", "Figure(", "VBox(", "HBox(", "FloatProgress(")), text[:200]
        if WIDGET in data:
            assert text.startswith("[interactive:"), text[:200]  # display.widget: a note, not the widget's repr
        if "<progress" in "".join(data.get("text/html", "")):
            assert "(100%)" in text and text.endswith("done"), text  # the bar's final state was saved
        if PLOTLY in data:
            fig = data[PLOTLY]
            figures.append(fig)
            if Path("/usr/bin/chromium").exists():
                assert "image/png" in data, text
            layout, traces = fig["layout"], fig["data"]
            if all(t.get("type") == "image" for t in traces) or layout.get("xaxis", {}).get("showticklabels") is False:
                continue  # picture panels: no data axes
            for axis in {"xaxis", "yaxis"} | {k for k in layout if re.fullmatch(r"[xy]axis\d*", k)}:
                assert layout.get(axis, {}).get("title", {}).get("text"), f"untitled {axis} in {text}"
            xs = [x for t in traces for x in (t.get("x") or []) if isinstance(x, (int, float)) and x > 0]
            for a in layout.get("annotations", []):
                if layout.get("xaxis", {}).get("type") == "log" and a.get("xref", "x") == "x" and xs:
                    assert a["x"] <= math.log10(max(xs)) + 1, f"annotation {a['text']} at 10^{a['x']} in {text}"
    return figures


def test_notebooks_01_02_03_at_toy2d_read_well_when_saved(tmp_path):
    # toy2d scores on 2-D points (energy distance), not with the digits CNN; 50 steps per stage.
    nb1 = papermill(tmp_path, "01_consistency_training.ipynb", ("preset", "toy2d"), ("steps0", 50), ("steps1", 50),
                    ("dfid_every", 25), ("dfid_n", 300))
    nb2 = papermill(tmp_path, "02_truncated_training.ipynb", ("preset", "toy2d"), ("steps", 50), ("dfid_every", 25),
                    ("dfid_n", 300))
    nb3 = papermill(tmp_path, "03_tradeoff_explorer.ipynb", ("preset", "toy2d"))
    titles = {}
    for name, nb in (("01", nb1), ("02", nb2), ("03", nb3)):
        titles[name] = [f["layout"]["title"]["text"] for f in check_saved_outputs(nb)]
        assert len(json.dumps(nb)) < 2_000_000, name  # no plotly.js bundle (FigureWidget state) in the file
    assert any("stage 1: dFID_t during training" in t for t in titles["01"])
    assert any("loss and gradient norm" in t for t in titles["02"])
    assert any("samples from the same noise" in t for t in titles["02"])
    assert any("one-step denoising" in t for t in titles["02"])
    text2 = json.dumps(nb2)
    assert "stage 1: using the run in" in text2 and "reused, not retrained" in text2  # 02 reuses 01's stage 1
    assert "no dFID rows" not in "".join(titles["02"])  # stage 1 and stage 2 both have dFID_t curves
    assert "toy2d trains on 2-D points" in json.dumps(nb1)  # the preset note
    rows = [json.loads(l) for l in (tmp_path / "runs" / "stage1" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [25, 50] and evals[0]["extractor"] == "energy-distance-2d"
    assert (tmp_path / "runs" / "stage2-tp1-wb0.1-rho0.25-s0.2-nu0.01" / "samples_1step.png").exists()


def write_inception_weights(path):
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as inc
    # A randomly initialised file in torch-fidelity's format, built without any download (numbers meaningless).
    real_url, real_load = inc.load_state_dict_from_url, inc.FeatureExtractorInceptionV3.load_state_dict
    inc.load_state_dict_from_url = lambda *a, **k: None
    inc.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd: None
    try:
        net = inc.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        inc.load_state_dict_from_url, inc.FeatureExtractorInceptionV3.load_state_dict = real_url, real_load
    torch.save(net.state_dict(), path)


def test_notebooks_01_02_at_cifar10_tiny(tmp_path):
    from tcmlab.checkpoint import sha256
    from tests.test_data import write_cifar
    write_cifar(tmp_path / "cifar", n=2)  # 5 batches of 2 CIFAR-format images
    weights = tmp_path / "inception.pth"
    write_inception_weights(weights)
    env = {"TCMLAB_INCEPTION_WEIGHTS": str(weights), "TCMLAB_INCEPTION_SHA256": sha256(weights)}
    tiny = (f"net.channels=16 net.channel_mult=1 net.depth=1 net.attn_resolutions= train.batch=4 "
            f"train.log_every=1 data.root={tmp_path / 'cifar'} from_scratch=true")
    common = (("preset", "cifar10"), ("overrides", tiny), ("dfid_every", 2), ("dfid_n", 4),
              ("data_root", tmp_path / "cifar"))
    out = papermill(tmp_path, "01_consistency_training.ipynb", ("steps1", 2), *common, env_extra=env)
    assert "no stage 0 here" in json.dumps(out)  # cifar10 has no stage 0: stage 1 starts from init_from / scratch
    papermill(tmp_path, "02_truncated_training.ipynb", ("steps", 2), *common, env_extra=env)
    rows = [json.loads(l) for l in (tmp_path / "runs" / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "eval" and r["extractor"] == "inception-v3-compat" for r in rows)


def test_notebook_01_trains_under_torchrun_with_gpus_2(tmp_path):
    # gpus > 1 launches torchrun (CPU processes with gloo here) and streams its metrics into the live plot.
    out = papermill(tmp_path, "01_consistency_training.ipynb", ("steps0", 4), ("steps1", 6), ("gpus", 2),
                    ("dfid_every", 3), ("dfid_n", 50))
    assert "on 2 processes (torchrun)" in json.dumps(out)
    rows = [json.loads(l) for l in (tmp_path / "runs" / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert {r["world"] for r in rows if r["kind"] == "train"} == {2}
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [3, 6]


def test_saved_output_checker_catches_what_it_looks_for():
    # check_saved_outputs must fail on each thing it exists to catch (the notebooks' figures pass it above).
    from tcmlab import display, plots
    import plotly.graph_objects as go

    def nb(*outs):
        return {"cells": [{"cell_type": "code", "outputs": list(outs)}]}

    def fig_output(fig):
        return {"output_type": "display_data", "data": display.bundle(fig)}
    good = plots.psi_figure(1.0, 0.2, 0.01, 0.25)
    assert len(check_saved_outputs(nb(fig_output(good)))) == 1
    bad = [nb({"output_type": "display_data", "data": {"text/plain": "FigureWidget({'data': []})"}}),
           nb({"output_type": "display_data", "data": {WIDGET: {"model_id": "x"}, "text/plain": "VBox(children=())"}}),
           nb({"output_type": "display_data", "data": {"text/plain": "stage 1: step 0/20 (0%)",
                                                       "text/html": "<progress value='0' max='20'></progress>"}}),
           nb(fig_output(go.Figure(go.Scatter(x=[1, 2], y=[1, 2]), layout=dict(title="untitled axes"))))]
    unplaced = go.Figure(go.Scatter(x=[0.1, 10], y=[1, 2]))
    unplaced.update_layout(xaxis_type="log", xaxis_title="t", yaxis_title="y")
    unplaced.add_annotation(x=10.0, y=1, yref="paper", text="t′")  # a log axis reads x=10 as 10^10
    bad.append(nb(fig_output(unplaced)))
    for notebook in bad:
        with pytest.raises(AssertionError):
            check_saved_outputs(notebook)


def test_notebook_03_slider_over_a_tprime_sweep(tmp_path):
    # The ci t′ sweep (2 seeds × t′ ∈ {0.5, 1} + control), then notebook 03 reading it: the trade-off figure for the
    # chosen trained t′ and its samples beside stage 1's, saved as static figures.
    sweep = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "tcmlab", "sweep", str(NB.parent / "sweeps" / "ci.toml"), "--out",
                        str(sweep), "--workers", "2", "--no-png"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    nb = papermill(tmp_path, "03_tradeoff_explorer.ipynb", ("sweep", sweep), ("tprime", 0.5))
    figs = {f["layout"]["title"]["text"]: f for f in check_saved_outputs(nb)}
    tradeoff = next(f for t, f in figs.items() if t.startswith("the trade-off at t′ = 0.5 (2 seeds"))
    names = [tr.get("name", "") for tr in tradeoff["data"]]
    assert any(n.startswith("stage 2, t′ = 0.5") for n in names) and any(n.startswith("control") for n in names)
    fid_vs_tprime = next(tr for tr in tradeoff["data"] if tr.get("name") == "stage 2 (each t′)")
    assert list(fid_vs_tprime["x"]) == [0.5, 1.0]
    assert any(t.startswith("samples from the same noise") for t in figs)
    assert "[interactive: a slider over the trained t′ values" in json.dumps(nb, ensure_ascii=False)


def test_tprime_sweep_reader_says_what_to_run(tmp_path):
    from tcmlab.explore import TPrimeSweep
    with pytest.raises(FileNotFoundError, match="python -m tcmlab sweep"):
        TPrimeSweep(tmp_path)
    (tmp_path / "results.csv").write_text("point,kind,stage,seed,metric,value\nseed0/s1,stage1,1,0,fid_1step,3\n")
    with pytest.raises(ValueError, match="does not vary t′"):
        TPrimeSweep(tmp_path)


def test_tprime_sweep_reader_takes_the_tprime_row_of_an_ablation(tmp_path):
    """A one-at-a-time sweep (sweeps/digits_claims.toml): the t′ values at the default w_b are read, the w_b = 0.01
    run (also at t′ = 1) is not averaged in; a product grid over t′ × w_b is refused."""
    from tcmlab.explore import TPrimeSweep
    head = "point,kind,stage,seed,s2.loss.t_prime,s2.loss.w_b,metric,t,value,floor\n"
    rows = ["seed0/s1,stage1,1,0,,,fid_1step,,100,35", "seed0/a,stage2,2,0,0.5,0.1,fid_1step,,90,35",
            "seed0/b,stage2,2,0,1.0,0.1,fid_1step,,80,35", "seed0/c,stage2,2,0,1.0,0.01,fid_1step,,400,35"]
    (tmp_path / "results.csv").write_text(head + "\n".join(rows) + "\n")
    sw = TPrimeSweep(tmp_path)
    assert sw.t_primes == [0.5, 1.0] and sw.fid("stage2", 1.0) == (80.0, 0.0) and sw.fid("stage1") == (100.0, 0.0)
    rows.append("seed0/d,stage2,2,0,0.5,0.01,fid_1step,,300,35")
    (tmp_path / "results.csv").write_text(head + "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="varies s2.loss.w_b together with t′"):
        TPrimeSweep(tmp_path)
    (tmp_path / "results.csv").write_text(head + "\n".join(rows[:2] + rows[3:4]) + "\n")  # w_b only, one t′ each
    with pytest.raises(ValueError, match="one t′ per setting"):
        TPrimeSweep(tmp_path)


def test_step_and_t_mid_parameters_name_themselves_and_stage2_overrides_skip_stages_0_and_1():
    from tcmlab import nbparams
    for bad in ("abc", 2.5, -3, True):
        with pytest.raises(ValueError, match="parameter steps must be a positive integer"):
            nbparams.as_steps("steps", bad)
    assert nbparams.as_steps("steps", "12") == 12 and nbparams.as_steps("steps", 7.0) == 7
    cfg2 = nbparams.stage2_config("ci", "runs/s1", 3, 0.1, 0.25, 0.2, 0.01)
    assert nbparams.check_t_mid(3, cfg2) == 3.0
    for bad in (80, 100, 0):  # T = 80 for ci: the sampler would go T -> T
        with pytest.raises(ValueError, match=r"parameter t_mid=.* must be in \(0, T\) = \(0, 80\)"):
            nbparams.check_t_mid(bad, cfg2)
    with pytest.warns(UserWarning, match="t_mid=2.9 is below tprime=3: the 2-step sampler uses t_mid = tprime"):
        assert nbparams.check_t_mid(2.9, cfg2) == 3.0  # stage 2 is trained on [t', T], as `evaluate` raises it
    # notebook 02's overrides are for stage 2; the stage 0/1 it trains when none is found take what applies there
    cfg0, cfg1 = nbparams.stage01_configs("ci", "out", overrides="loss.teacher_dropout=false net.dropout=0.05",
                                          only_applicable=True)
    assert cfg0.net.dropout == cfg1.net.dropout == 0.05
    with pytest.raises(ValueError, match="teacher_dropout"):  # notebook 01 still refuses what does not exist
        nbparams.stage01_configs("ci", "out", overrides="loss.teacher_dropout=false")


def test_denoise_strip_leaves_out_levels_above_the_models_T(ci_runs):
    import torch

    from tcmlab import plots
    from tcmlab.model import load_model
    m = load_model(ci_runs / "s1")  # T = 80
    fig = plots.denoise_strip({"s1": m}, torch.zeros(2, 1, 8, 8), ts=(0.5, 5.0, 20.0, 100.0))
    titles = [a.text for a in fig.layout.annotations]
    assert titles[:3] == ["t=0.5", "t=5", "t=20"] and "t=100" not in titles


def test_default_run_folder_is_one_per_preset(monkeypatch):
    from tcmlab import nbparams
    monkeypatch.delenv("TCMLAB_NB_OUT", raising=False)
    assert nbparams.run_root("", "ci") != nbparams.run_root("", "digits")  # a ci run never blocks a digits one
    assert nbparams.run_root("", "digits") == Path("../runs/nb/digits")
    assert nbparams.run_root("elsewhere", "digits") == Path("elsewhere")
    monkeypatch.setenv("TCMLAB_NB_OUT", "/tmp/x")
    assert nbparams.run_root("elsewhere", "ci") == Path("/tmp/x")
    monkeypatch.delenv("TCMLAB_NB_OUT")
    with pytest.raises(ValueError, match="preset"):
        nbparams.run_root("", "cifar")


def test_explorer_sliders_hold_the_parameters_values():
    from tcmlab import nbparams
    assert nbparams.log_span(0.1, -3, 1.5) == (-3, 1.5)
    lo, hi = nbparams.log_span(1e4, -3, 1.5)  # ν = 10⁴ (nearly log-normal) must not be clamped to 10^1.5
    assert lo == -3 and math.isclose(hi, 4.0)
    assert math.isclose(nbparams.log_span(0.005, -1.5, 1.85)[0], math.log10(0.005))
    choices = dict((v, label) for label, v in nbparams.w_b_choices(0.0))
    assert 0.0 in choices and 0.1 in choices and 10.0 in choices and 0.001 in choices
    assert nbparams.w_b_choices(0.25)[0] == ("0", 0.0) and ("0.25", 0.25) in nbparams.w_b_choices(0.25)


def test_notebook_02_overrides_are_applied_or_refused_never_dropped():
    from tcmlab import nbparams
    cfg = nbparams.stage2_config("ci", "runs/s1", 1, 0.1, 0.25, 0.2, 0.01,
                                 overrides="loss.teacher_dropout=false loss.teacher_passes=full")
    assert cfg.loss.teacher_dropout is False and cfg.loss.teacher_passes == "full"  # was reset to True
    for item, param in (("loss.t_prime=0.5", "tprime"), ("loss.w_b=1", "w_b"), ("train.steps=9", "steps")):
        with pytest.raises(ValueError, match=rf"{item.split('=')[0]} \(use the parameter {param}"):
            nbparams.stage2_config("ci", "runs/s1", 1, 0.1, 0.25, 0.2, 0.01, overrides=item)
    base = nbparams.stage2_dir("out", cfg)
    assert base == Path("out/stage2-tp1-wb0.1-rho0.25-s0.2-nu0.01")
    ablation = nbparams.stage2_dir("out", cfg, "loss.teacher_dropout=false data.root=/d/c10 train.batch_gpu=4")
    assert ablation == Path("out/stage2-tp1-wb0.1-rho0.25-s0.2-nu0.01-loss.teacher_dropout=false")
    both = "loss.teacher_passes=full loss.ratio=0.99 loss.teacher_dropout=false"  # ratio 0.99: the preset's own
    assert nbparams.stage2_dir("out", cfg, both) == Path("out/stage2-tp1-wb0.1-rho0.25-s0.2-nu0.01-"
                                                         "loss.teacher_dropout=false-loss.teacher_passes=full")
    twice = "loss.teacher_dropout=false loss.teacher_dropout=true"  # the last one counts: the preset's own value
    assert nbparams.stage2_dir("out", cfg, twice) == base
    with pytest.raises(ValueError, match=r"init_from \(use the parameter stage1_run"):  # would replace stage1_run
        nbparams.stage2_config("ci", "runs/s1", 1, 0.1, 0.25, 0.2, 0.01, overrides="init_from=/elsewhere/s1")


def test_notebook_02_resumes_an_unfinished_stage_1_of_its_own_and_names_a_given_one(tmp_path, ci_runs):
    from tcmlab import nbparams
    from tcmlab.config import preset
    from tcmlab.train import train

    assert nbparams.find_stage1("", tmp_path) is None  # none yet: trained there
    shutil.copytree(ci_runs / "s1", tmp_path / "stage1")
    assert nbparams.find_stage1("", tmp_path) == tmp_path / "stage1"  # finished: reused
    assert "at step 20 of 20, finished (reused" in nbparams.stage1_note(tmp_path / "stage1")
    partial = tmp_path / "partial"
    cfg = preset("ci", 1, init_from=str(ci_runs / "s0"))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=24))  # notebook 01's -p steps1 24
    train(cfg, partial / "stage1", steps=3, progress=False)
    assert nbparams.find_stage1(str(partial / "stage1"), tmp_path) == partial / "stage1"  # given: used, and said
    assert "at step 3 of 24, UNFINISHED: stage 2 starts from its EMA at step 3" in nbparams.stage1_note(
        partial / "stage1")
    assert nbparams.find_stage1("", partial) is None  # unfinished in out: the notebook trains it on
    cfg0, cfg1, note = nbparams.stage1_to_train("ci", partial)
    assert cfg0 is None and cfg1 == cfg and "resuming the unfinished run" in note  # its own config, no stage 0
    assert train(cfg1, partial / "stage1", progress=False).step == 24
    cfg0, cfg1, note = nbparams.stage1_to_train("ci", tmp_path / "fresh")
    assert cfg0 is not None and cfg1.train.steps == 20 and "no stage-1 run given or found" in note
    with pytest.raises(ValueError, match="parameter stage1_run='.*metrics.jsonl' holds no stage-1 checkpoint"):
        nbparams.find_stage1(str(partial / "stage1" / "metrics.jsonl"), tmp_path)
    with pytest.raises(ValueError, match="parameter stage1_run='.*s0' holds a stage-0 run: stage 2 starts from a "
                                         "stage-1"):
        nbparams.find_stage1(str(ci_runs / "s0"), tmp_path)
    with pytest.raises(ValueError, match="parameter stage1_run=5 must be a path"):
        nbparams.find_stage1(5, tmp_path)  # papermill -p stage1_run 5
    with pytest.raises(ValueError, match="parameter init_from='.*nowhere' does not exist"):
        nbparams.stage01_configs("ci", tmp_path, init_from=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="parameter dfid_n must be at least 2"):
        nbparams.dfid_settings("ci", 0, 1)


def test_dfid_curves_mark_each_stage_2_runs_own_t_prime(tmp_path, ci_runs):
    # notebook 03 plots every stage2-* run of its folder: one t′ line at the notebook's parameter could match none
    from tcmlab import plots
    from tcmlab.config import from_dict, to_json
    cfg = from_dict(json.loads((ci_runs / "s2" / "config.json").read_text()))
    runs = {}
    for tp in (0.5, 2.0):
        run = tmp_path / f"stage2-tp{tp:g}"
        run.mkdir()
        (run / "config.json").write_text(to_json(dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss,
                                                                                                   t_prime=tp))))
        (run / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 5, "dfid": {"1.0": 50.0}}) + "\n")
        runs[run.name] = run
    runs["stage 1"] = ci_runs / "s1"  # no eval rows: named in the title
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "config.json").write_text("{")  # unreadable: plotted without a t′ line, not a failed figure
    (torn / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 5, "dfid": {"1.0": 60.0}}) + "\n")
    runs["torn"] = torn
    fig = plots.dfid_curves(runs)
    assert sorted(s.x0 for s in fig.layout.shapes) == [0.5, 2.0]
    assert [a.text for a in fig.layout.annotations] == ["t′=0.5", "t′=2"]
    assert "t′=0.5)" in fig.data[0].name and "no dFID rows in: stage 1" in fig.layout.title.text
    assert [s.x0 for s in plots.dfid_curves(runs, t_prime=1.0).layout.shapes] == [1.0]  # notebook 02: the one given


def test_tprime_sweep_samples_at_the_sweeps_own_t_mid(tmp_path):
    # the explorer's 2-step samples go T -> the sweep's [eval] t_mid (from its cards), not a hard-coded 1
    from tcmlab.explore import TPrimeSweep
    from tcmlab.sweep_table import write_csv
    base = {"point": "seed0/s1", "kind": "stage1", "stage": 1, "seed": 0, "s2.loss.t_prime": "", "t": "",
            "floor": 35, "card": ""}
    rows = [{**base, "metric": "fid_1step", "value": 100},
            {**base, "point": "seed0/a", "kind": "stage2", "stage": 2, "s2.loss.t_prime": 0.5, "metric": "fid_1step",
             "value": 90},
            {**base, "point": "seed0/b", "kind": "stage2", "stage": 2, "s2.loss.t_prime": 1.0, "metric": "fid_1step",
             "value": 80}]
    write_csv(tmp_path / "results.csv", rows)
    assert TPrimeSweep(tmp_path).t_mid() == 1.0  # no 2-step card: the paper's CIFAR-10 value
    rows.append({**base, "metric": "fid_2step", "value": 95, "card": json.dumps({"steps": [80.0, 0.821]})})
    write_csv(tmp_path / "results.csv", rows)
    assert TPrimeSweep(tmp_path).t_mid() == 0.821
