"""The sweep runner (tcmlab.sweep, `python -m tcmlab sweep`): spec parsing and grid expansion, an end-to-end ci sweep
through the CLI on worker processes, the control point, resuming an interrupted sweep, bad specs, and dispatch
through submitit's LocalExecutor. Total time: about two minutes on two shared CPU cores."""

import csv
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from tcmlab import sweep, sweep_dispatch
from tcmlab.__main__ import main
from tcmlab.model import load_state

ROOT = Path(__file__).resolve().parents[1]
CI_SPEC = ROOT / "sweeps" / "ci.toml"

GRID_SPEC = """
preset = "ci"
seeds = [0, 1]
control = true
[stage1]
steps = 10
grid = { "loss.q" = [2.0, 4] }
[stage2]
steps = 7
set = { "loss.rho" = 0.5 }
grid = { "loss.t_prime" = [0.5, 1.0], "loss.w_b" = [0, 0.1] }
"""


def inline(spec_file, out, log=lambda s: None):
    """The sweep of a spec file into `out`, in this process, without PNGs."""
    return sweep.run_sweep(sweep.load_spec(spec_file, out=out), sweep.Dispatch("inline"), png=False, log=log)


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_grid_expansion_shares_stage0_and_stage1_per_seed(tmp_path):
    spec = sweep.parse_spec(tomllib.loads(GRID_SPEC), "grid.toml", out=tmp_path)
    points = sweep.expand(spec)
    by_id = {p.id: p for p in points}
    kinds = [p.kind for p in points]
    # per seed: 1 stage-0 run, 2 stage-1 runs (q), 2 × 2 × 2 stage-2 runs, one control per stage-1 run
    assert (kinds.count("stage0"), kinds.count("stage1"), kinds.count("stage2"), kinds.count("control")) == (2, 4, 16, 4)
    assert len({p.run_dir for p in points}) == len(points) == 26
    for p in points:
        assert p.cfg.train.seed == p.seed
        parent = by_id.get(p.parent)
        if p.kind == "stage0":
            assert parent is None and p.cfg.init_from is None
            continue
        assert parent.seed == p.seed and p.parent_dir == parent.run_dir
        if p.kind == "control":  # the stage-1 run continued: same config but for train.steps = 10 + 7
            assert parent.kind == "stage1" and p.cfg.train.steps == 17 and p.cfg.stage == 1
            assert dataclasses.replace(p.cfg.train, steps=10) == parent.cfg.train
            assert p.cfg.loss == parent.cfg.loss and p.cfg.init_from == parent.cfg.init_from
            continue
        assert p.cfg.init_from == parent.run_dir and parent.kind == f"stage{p.stage - 1}"
        values = dict(p.values)
        if p.kind == "stage1":
            assert p.cfg.loss.q == values["s1.loss.q"] and p.cfg.train.steps == 10
        if p.kind == "stage2":  # its stage-1 run is the one with the same seed and q
            assert values["s1.loss.q"] == dict(parent.values)["s1.loss.q"] == by_id[p.parent].cfg.loss.q
            assert (p.cfg.loss.t_prime, p.cfg.loss.w_b) == (values["s2.loss.t_prime"], values["s2.loss.w_b"])
            assert p.cfg.loss.rho == 0.5 and p.cfg.train.steps == 7 and isinstance(p.cfg.loss.w_b, float)
    stage2_parents = {(p.seed, p.parent) for p in points if p.kind == "stage2"}
    assert len(stage2_parents) == 4  # 16 stage-2 runs hang off 4 stage-1 runs
    tasks, states = sweep.plan(points, spec.eval)
    assert set(states.values()) == {"new"}
    deps = {t.key: t.deps for t in tasks}
    for p in points:
        if p.parent is not None:
            assert deps[f"train {p.id}"] == (f"train {p.parent}",)
    assert sweep.grid_columns(spec) == ["s1.loss.q", "s2.loss.t_prime", "s2.loss.w_b"]


UNION_SPEC = """
preset = "ci"
seeds = [3]
[stage2]
grid = [{ "loss.w_b" = [0, 0.1, 1] }, { "loss.rho" = [0.25, 0.5] }, { "loss.psi_scale" = [2.0], "loss.psi_nu" = [1e4] }]
"""


def test_grid_list_is_the_union_of_one_at_a_time_ablations(tmp_path):
    spec = sweep.parse_spec(tomllib.loads(UNION_SPEC), "union.toml", out=tmp_path)
    stage2 = [p for p in sweep.expand(spec) if p.kind == "stage2"]
    # w_b 3 + rho 2 + one ψ̄ shape, less the default point that the w_b and rho tables both hold: 5 runs
    got = [(p.cfg.loss.w_b, p.cfg.loss.rho, p.cfg.loss.psi_scale, p.cfg.loss.psi_nu) for p in stage2]
    assert got == [(0.0, 0.25, 0.2, 0.01), (0.1, 0.25, 0.2, 0.01), (1.0, 0.25, 0.2, 0.01), (0.1, 0.5, 0.2, 0.01),
                   (0.1, 0.25, 2.0, 1e4)]
    assert len({p.run_dir for p in stage2}) == 5
    assert stage2[1].id == "seed3/s2__w_b=0.1__rho=0.25__psi_scale=0.2__psi_nu=0.01"
    assert sweep.grid_columns(spec) == ["s2.loss.w_b", "s2.loss.rho", "s2.loss.psi_scale", "s2.loss.psi_nu"]
    for p in stage2:  # every point names every grid field, so the table has no holes
        assert [c for c, _ in p.values] == sweep.grid_columns(spec)
    bad = sweep.parse_spec(tomllib.loads(UNION_SPEC.replace("0.25, 0.5", "0.25, 1.5")), "union.toml", out=tmp_path)
    with pytest.raises(sweep.SpecError, match=r"loss.rho = 1.5.*\(0, 1\)"):
        sweep.expand(bad)
    with pytest.raises(sweep.SpecError, match=r"grid\[1\] loss.rho.*a number"):
        sweep.parse_spec(tomllib.loads(UNION_SPEC.replace("0.25, 0.5", '0.25, "x"')), "union.toml", out=tmp_path)
    with pytest.raises(sweep.SpecError, match="or a list of such tables"):
        sweep.parse_spec(tomllib.loads('preset = "ci"\n[stage2]\ngrid = []'), "empty.toml", out=tmp_path)


def test_ci_spec_file_expands_to_ten_points(tmp_path):
    spec = sweep.load_spec(CI_SPEC, out=tmp_path)
    points = sweep.expand(spec)
    assert [p.id for p in points if p.seed == 0] == ["seed0/s0", "seed0/s1", "seed0/s2__t_prime=0.5",
                                                     "seed0/s2__t_prime=1.0", "seed0/control"]
    assert len(points) == 10 and spec.eval.n == 50


@pytest.mark.parametrize("text, expected", [
    ('preset = "ci"\n[stage2]\ngrid = { "loss.tprime" = [0.5] }', ["loss.tprime", "not a field", "loss.t_prime"]),
    ('preset = "ci"\n[stage2]\ngrid = { "loss.t_prime" = ["a"] }', ["loss.t_prime", "must be a number"]),
    ('preset = "ci"\n[stage2]\ngrid = { "loss.t_prime" = [100] }', ["loss.t_prime", "(0, T=80)"]),
    ('preset = "ci"\nseed = [0]', ["unknown key 'seed'", "seeds"]),
    ('preset = "ci"\n[stage2]\nset = { "train.seed" = 3 }', ["train.seed", "seeds = [...]"]),
    ('preset = "ci"\n[stage1]\nsteps = "many"', ["[stage1] steps", "integer"]),
    ('preset = "ci"\n[eval]\nn = 1', ["[eval] n", ">= 2"]),
    ('preset = "ci"\n[eval]\ndraws = 0', ["[eval] draws", ">= 1"]),
    ('preset = "nope"', ["preset", "ci"]),
    ('preset = "ci', ["not valid TOML"]),
    (None, ["does not exist"]),
    ('preset = "ci"\nstages = [2]', ["stages = [2] has no stage 1", "add 1 to stages", '{ "init_from" = "RUN_DIR" }']),
    ('preset = "cifar10"', ["CIFAR-10 stage 1", '"init_from" = "edm-cifar10', '"from_scratch" = true']),
    ('preset = "ci"\nseeds = [9223372036854775807]', ["seeds must be integers 0 <= seed < 2**32"]),
    ('preset = "ci"\n[eval]\nseed = 9007199254740992', ["[eval] seed must be an integer 0 <= seed < 2**53"]),
])
def test_bad_spec_is_one_error_line(tmp_path, capsys, text, expected):
    path = tmp_path / "spec.toml"
    if text is not None:
        path.write_text(text)
    assert main(["sweep", str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for part in expected:
        assert part in err[0]
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def ci_sweep(tmp_path_factory):
    """sweeps/ci.toml run once through the CLI on two worker processes."""
    out = tmp_path_factory.mktemp("ci_sweep")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "tcmlab", "sweep", str(CI_SPEC), "--out", str(out), "--workers", "2",
                        "--no-png"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-3000:]
    return out, p.stdout


def test_cli_sweep_end_to_end(ci_sweep):
    out, stdout = ci_sweep
    assert "10 to train" in stdout and "8 to evaluate" in stdout
    table = _read_csv(out / "results.csv")
    points = {r["point"] for r in table}
    assert points == {f"seed{s}/{n}" for s in (0, 1) for n in ("s1", "s2__t_prime=0.5", "s2__t_prime=1.0", "control")}
    for r in table:
        if r["metric"] in ("fid_1step", "fid_2step", "dfid"):
            assert float(r["floor"]) > 0 and r["n"] == r["floor_n"] == "50"
        assert json.loads(r["card"])["n"] == 50
    # stage-2 points: dFID at their own t′ (and at T = 80 = the 1-step FID's noise level)
    for r in (r for r in table if r["kind"] == "stage2" and r["metric"] == "fid_1step"):
        ts = {float(x["t"]) for x in table if x["point"] == r["point"] and x["metric"] == "dfid"}
        assert float(r["s2.loss.t_prime"]) in ts and 80.0 in ts
    steps = {r["kind"]: r["steps"] for r in table}
    assert steps == {"stage1": "20", "stage2": "20", "control": "40"}
    # summary: mean and sample std of each grid point over the 2 seeds, computed here from results.csv
    summary = _read_csv(out / "summary.csv")
    assert len(summary) == len(table) // 2
    for s in summary:
        vals = [float(r["value"]) for r in table if all(r[c] == s[c] for c in
                                                        ("kind", "s2.loss.t_prime", "metric", "t", "n"))]
        assert len(vals) == int(s["count"]) == 2
        assert float(s["mean"]) == pytest.approx(statistics.fmean(vals))
        assert float(s["std"]) == pytest.approx(statistics.stdev(vals))
    assert sweep.summarize(table) == sweep.summarize(sweep.read_csv(out / "results.csv"))
    md = (out / "summary.md").read_text()  # the markdown table (make results prints it)
    one = next(s for s in summary if s["kind"] == "control" and s["metric"] == "fid_1step")
    assert f"| control | fid_1step | {float(one['mean']):.4g} ± {float(one['std']):.4g} | 2 |" in md
    for name, traces in (("fid", 3), ("dfid", 5)):  # 1- and 2-step FID / stage 1, two t′, control; and the floor
        fig = json.loads((out / "figures" / f"{name}.json").read_text())
        assert len(fig["data"]) == traces
        assert (out / "figures" / f"{name}.html").exists()
    # during training ([eval] every = 10): dFID_t and 1-step FID at steps 10, 20 (the control continues to 40)
    curves = _read_csv(out / "curves.csv")
    steps_of = lambda point: sorted({int(r["step"]) for r in curves if r["point"] == point})
    assert steps_of("seed0/s1") == [10, 20] and steps_of("seed1/s2__t_prime=0.5") == [10, 20]
    assert steps_of("seed0/control") == [10, 20, 30, 40]
    last = json.loads((out / "seed1" / "s2__t_prime=0.5.json").read_text())  # same EMA, noise and n at step 20
    final = {r["card"]["metric"] + str(r["card"]["steps"]): r["fid"] for r in last["rows"]}
    at20 = {r["metric"] + r["t"]: float(r["value"]) for r in curves if r["point"] == "seed1/s2__t_prime=0.5"
            and r["step"] == "20"}
    assert at20["fid_1step"] == pytest.approx(final["fid[80.0]"])
    assert at20["dfid0.5"] == pytest.approx(final["dfid[0.5]"])
    # the steps each run trained itself (a control: the 20 after its stage-1 run) and their median time per step
    timing = {r["point"]: r for r in _read_csv(out / "timing.csv")}
    assert {k: int(r["steps_trained"]) for k, r in timing.items() if k.startswith("seed0/")} == {
        "seed0/s0": 20, "seed0/s1": 20, "seed0/s2__t_prime=0.5": 20, "seed0/s2__t_prime=1.0": 20, "seed0/control": 20}
    assert all(0 < float(r["sec_per_step"]) < 5 for r in timing.values())
    assert timing["seed1/s2__t_prime=1.0"]["s2.loss.t_prime"] == "1.0"
    fig = json.loads((out / "figures" / "training_stage2_t_prime=0.5.json").read_text())
    assert "mean ± std over 2 seed(s)" in fig["layout"]["title"]["text"]
    assert [tr["name"] for tr in fig["data"]][:2] == ["1-step FID", "dFID at t=0.05"]
    # the stage-2 runs of a seed start from that seed's stage-1 run, trained once
    for seed in (0, 1):
        for t in ("0.5", "1.0"):
            cfg = json.loads((out / f"seed{seed}" / f"s2__t_prime={t}" / "config.json").read_text())
            assert cfg["init_from"] == str(out / f"seed{seed}" / "s1") and cfg["train"]["seed"] == seed


def test_figures_without_a_png_renderer(ci_sweep, tmp_path, monkeypatch):
    """PNG export needs kaleido and a Chromium: where it fails, the figures are still written as .json and .html and
    the reason is reported, not raised."""
    import plotly.graph_objects as go

    def no_chrome(self, *a, **kw):
        raise RuntimeError("Kaleido requires Google Chrome to be installed")

    monkeypatch.setattr(go.Figure, "write_image", no_chrome)
    summary = sweep.summarize(sweep.read_csv(ci_sweep[0] / "results.csv"))
    paths, note = sweep.figures(summary, tmp_path)
    assert "kaleido could not render" in note and "Chrome" in note
    assert sorted(p.name for p in paths) == ["dfid.html", "dfid.json", "fid.html", "fid.json"]


def test_control_is_stage1_trained_longer(ci_sweep, tmp_path):
    """The control (stage 1 continued from the shared stage-1 checkpoint) equals a stage-1 run trained for
    20 + 20 steps in one go from the same stage-0 run and seed."""
    from tcmlab.config import preset
    from tcmlab.train import train

    out, _ = ci_sweep
    cfg = json.loads((out / "seed1" / "control" / "config.json").read_text())
    assert cfg["train"]["steps"] == 40 and cfg["stage"] == 1
    direct = preset("ci", 1, init_from=str(out / "seed1" / "s0"))
    direct = dataclasses.replace(direct, train=dataclasses.replace(direct.train, steps=40, seed=1))
    train(direct, tmp_path / "direct", progress=False)
    a, b = load_state(out / "seed1" / "control")[0], load_state(tmp_path / "direct")[0]
    assert a["step"] == b["step"] == 40
    for k in a["ema"]:
        torch.testing.assert_close(a["ema"][k], b["ema"][k])


def test_resume_after_interruption(ci_sweep, monkeypatch):
    """Lost results are recomputed, a run that never started is trained, a half-trained run resumes from its
    checkpoint, and nothing finished is trained or evaluated again (the last test on this sweep: it changes it)."""
    import tcmlab.train
    from tcmlab.train import train

    out, _ = ci_sweep
    spec = sweep.load_spec(CI_SPEC, out=out)
    by_id = {p.id: p for p in sweep.expand(spec)}
    lost, gone, half = by_id["seed0/s2__t_prime=0.5"], by_id["seed1/control"], by_id["seed1/s2__t_prime=1.0"]
    before = _read_csv(out / "results.csv")
    lost.results_path.unlink()
    sweep.shutil.rmtree(gone.run_dir)
    gone.results_path.unlink()
    sweep.shutil.rmtree(half.run_dir)
    half.results_path.unlink()
    train(half.cfg, half.run_dir, steps=10, progress=False)  # interrupted at step 10 of 20
    untouched = [f for p in by_id.values() if p not in (gone, half)
                 for f in (Path(p.run_dir) / "latest.safetensors", p.results_path) if f.exists()]
    mtimes = {f: f.stat().st_mtime_ns for f in untouched}
    assert len(mtimes) == 8 + 5  # the other 8 checkpoints (the lost results' one too), the other 5 results

    trained, evaluated = [], []  # (run, the checkpoint step train() finds there) and evaluated points
    evaluate_point = sweep._evaluate_point
    monkeypatch.setattr(tcmlab.train, "train", lambda cfg, run_dir, **kw: trained.append(
        (str(run_dir), sweep.checkpoint_step(run_dir))) or train(cfg, run_dir, **kw))
    monkeypatch.setattr(sweep, "_evaluate_point", lambda p, e, d: evaluated.append(p.id) or evaluate_point(p, e, d))
    r = sweep.run_sweep(spec, sweep.Dispatch("inline"), png=False, log=lambda s: None)

    assert r.failed == {}
    assert r.states == {**{k: "done" for k in by_id}, lost.id: "trained", gone.id: "new", half.id: "partial"}
    assert sorted(trained) == [(gone.run_dir, 20), (half.run_dir, 10)]  # the control starts from stage 1's step 20;
    # the half-trained run resumes at step 10, not from scratch
    assert sorted(evaluated) == sorted([lost.id, gone.id, half.id])
    assert {f: f.stat().st_mtime_ns for f in untouched} == mtimes
    after = _read_csv(out / "results.csv")
    assert len(after) == len(before)
    old = {(r["point"], r["metric"], r["t"]): r["value"] for r in before}
    for row in after:  # the same checkpoint evaluated again gives the same numbers (up to the float rounding of a
        # different torch thread count: the sweep's workers run one thread, this inline call the machine's default)
        if row["point"] == lost.id:
            assert float(row["value"]) == pytest.approx(float(old[(row["point"], row["metric"], row["t"])]), rel=1e-6)
    # a second call finds everything done
    assert set(sweep.run_sweep(spec, sweep.Dispatch("inline"), png=False, log=lambda s: None).states.values()) \
        == {"done"}


def test_sigterm_stops_the_sweep_with_checkpoints(tmp_path):
    """SIGTERM to `python -m tcmlab sweep` reaches the worker processes: each running run writes a checkpoint and
    stops, the sweep exits with 130, and the next call resumes those runs."""
    spec = tmp_path / "long.toml"
    spec.write_text('preset = "ci"\nstages = [1]\n[stage1]\nsteps = 100000\n')
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "tcmlab", "sweep", str(spec), "--out", str(out), "--workers", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while sweep.checkpoint_step(out / "seed0" / "s1") is None and time.monotonic() < deadline:
            time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        log = p.communicate(timeout=60)[0]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, log
    assert "Run the same command again to resume" in log
    step = sweep.checkpoint_step(out / "seed0" / "s1")
    assert 0 < step < 100000
    tasks, states = sweep.plan(sweep.expand(sweep.load_spec(spec, out=out)), sweep.EvalSpec())
    assert states == {"seed0/s1": "partial"} and [t.key for t in tasks] == ["train seed0/s1", "evaluate seed0/s1"]


def test_submitit_local_executor(tmp_path):
    """The same scheduling through submitit (here its LocalExecutor, one process per task; SLURM on a cluster)."""
    spec_file = tmp_path / "tiny.toml"
    spec_file.write_text('preset = "ci"\nstages = [1]\n[stage1]\nsteps = 5\n'
                         '[eval]\nn = 20\ndfid = false\nkinds = ["stage1"]\n')
    spec = sweep.load_spec(spec_file, out=tmp_path / "out")
    logs = []
    r = sweep.run_sweep(spec, sweep.Dispatch("submitit-local", workers=2), png=False, log=logs.append)
    assert r.failed == {}, logs
    assert [row["metric"] for row in r.table] == ["fid_1step", "kid_1step", "fid_2step", "kid_2step"]
    assert r.table[0]["point"] == "seed0/s1" and r.table[0]["steps"] == 5
    jobs = list((tmp_path / "out" / "submitit").glob("*/*_result.pkl"))
    assert len(jobs) == 2  # train, then evaluate: one job each
    # a failing job is reported with its reason, and the task depending on it is not run
    (tmp_path / "out" / "seed0" / "s1" / "latest.safetensors").write_bytes(b"not a checkpoint")
    r = sweep.run_sweep(spec, sweep.Dispatch("submitit-local"), png=False, log=logs.append)
    assert "damaged" in r.failed["train seed0/s1"]
    assert r.failed["evaluate seed0/s1"] == "not run: train seed0/s1 failed"
    assert "Traceback" in (tmp_path / "out" / "failures.txt").read_text()


def test_slurm_job_parameters(tmp_path, monkeypatch, capsys):
    """--executor slurm: the sbatch script submitit would submit carries the partition, time, CPUs, GPUs and memory;
    without SLURM (no srun) the CLI says so in one error line before doing anything."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["sweep", str(CI_SPEC), "--out", str(tmp_path / "out"), "--executor", "slurm"]) == 2
    assert "no SLURM here" in capsys.readouterr().err
    (tmp_path / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "srun").chmod(0o755)
    d = sweep.Dispatch("slurm", partition="gpu", time_min=30, gpus=1, cpus=4, mem_gb=16)
    ex = sweep_dispatch.submitit_executor(d, tmp_path / "jobs")
    script = ex._executor._make_submission_file_text("python -m x", "UID")
    for line in ("--partition=gpu", "--time=30", "--cpus-per-task=4", "--gpus-per-node=1", "--mem=16GB"):
        assert f"#SBATCH {line}\n" in script


def test_ready_trainings_start_by_how_much_waits_on_them():
    """With 2 workers, a third seed's stage 0 → 1 chain starts before the first seeds' stage-2 runs, not after
    them (where it would run alone at the end with one worker idle)."""
    from types import SimpleNamespace

    tasks = []
    for seed in "abc":
        t0 = sweep.Task("train", SimpleNamespace(id=f"{seed}/s0"))
        t1 = sweep.Task("train", SimpleNamespace(id=f"{seed}/s1"), (t0.key,))
        tasks += [t0, t1] + [sweep.Task("train", SimpleNamespace(id=f"{seed}/x{k}"), (t1.key,)) for k in range(3)]
    waiting = sweep_dispatch.waiting_on(tasks)
    assert waiting["train c/s0"] == 4 and waiting["train a/x0"] == 0
    order = []
    runner = sweep_dispatch.Submitter(lambda t: order.append(t.point.id) or SimpleNamespace(done=lambda: True,
                                                                                             result=lambda: None))
    assert sweep_dispatch.schedule(tasks, runner, 2, log=lambda s: None) == {}
    assert order[:4] == ["a/s0", "b/s0", "c/s0", "a/s1"]
    assert order.index("c/s1") < order.index("a/x0")


def test_two_step_evaluation_of_a_large_tprime_goes_through_tprime(tmp_path, ci_runs):
    """A stage-2 model with t′ = 2 > t_mid = 1 is only trained on [t′, T]: its 2-step FID samples 80 → t′, and the
    card says so (the sweep's t′ = 1.5 and 4 points were refused before)."""
    from tcmlab import evalsets, metrics
    from tcmlab.config import preset
    from tcmlab.model import load_model
    from tcmlab.train import train

    cfg = preset("ci", 2, init_from=str(ci_runs / "s1"))
    cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, t_prime=2.0),
                              train=dataclasses.replace(cfg.train, steps=2))
    train(cfg, tmp_path / "s2", progress=False)
    rows = metrics.evaluate_run(load_model(tmp_path / "s2"), evalsets.digits_eval_set(), n=20, t_mid=1.0, dfid=False)
    assert [list(r["card"]["steps"]) for r in rows] == [[80.0], [80.0, 2.0]]
    rows = metrics.evaluate_run(load_model(ci_runs / "s2"), evalsets.digits_eval_set(), n=20, t_mid=1.0, dfid=False)
    assert [list(r["card"]["steps"]) for r in rows] == [[80.0], [80.0, 1.0]]  # t′ = 1 of the ci preset: unchanged


def test_an_evaluated_stage0_point_is_scored_with_the_heun_sampler(tmp_path):
    """Stage 0 is a diffusion model: its table rows are EDM's Heun sampler's (fid_heun, kid_heun), not the
    consistency sampler's 1- and 2-step rows, and summary.md lists fid_heun."""
    spec_file = tmp_path / "s0.toml"
    spec_file.write_text('preset = "ci"\nstages = [0]\n[stage0]\nsteps = 3\n'
                         '[eval]\nn = 20\ndfid = false\nkinds = ["stage0"]\n')
    spec = sweep.load_spec(spec_file, out=tmp_path / "out")
    r = sweep.run_sweep(spec, sweep.Dispatch("inline"), png=False, log=lambda s: None)
    assert r.failed == {}
    metrics = [row["metric"] for row in r.table]
    assert metrics == ["fid_heun", "kid_heun"]
    heun = next(row for row in r.table if row["metric"] == "fid_heun")
    assert len(json.loads(heun["card"])["steps"]) == 18 and heun["n"] == 20 and heun["floor"] > 0
    assert "| fid_heun |" in (tmp_path / "out" / "summary.md").read_text()
    assert [tr.name for tr in sweep.summary_figures(r.summary)["fid"].data] == ["Heun FID (stage 0: EDM's sampler)",
                                                                             "real-vs-real floor"]


def test_results_written_before_a_config_field_existed_stay_done(tmp_path):
    """A results file from before train.cudnn_benchmark existed (its config lacks the key) is still this point's
    evaluation; one whose config differs in a value is stale."""
    spec_file = tmp_path / "s0.toml"
    spec_file.write_text('preset = "ci"\nstages = [0]\n[stage0]\nsteps = 2\n[eval]\nn = 20\nkinds = ["stage0"]\n')
    spec = sweep.load_spec(spec_file, out=tmp_path / "out")
    assert sweep.run_sweep(spec, sweep.Dispatch("inline"), png=False, log=lambda s: None).failed == {}
    point = next(p for p in sweep.expand(spec) if p.evaluate)
    assert sweep.status(point, spec.eval) == "done"
    stored = json.loads(point.results_path.read_text())
    del stored["config"]["train"]["cudnn_benchmark"]
    point.results_path.write_text(json.dumps(stored))
    assert sweep.status(point, spec.eval) == "done"
    stored["config"]["train"]["compile"] = True  # a speed option: the same point
    point.results_path.write_text(json.dumps(stored))
    assert sweep.status(point, spec.eval) == "done"
    stored["config"]["train"]["lr"] *= 2
    point.results_path.write_text(json.dumps(stored))
    assert sweep.status(point, spec.eval) == "trained"
    stored["config"] = "not a config"
    point.results_path.write_text(json.dumps(stored))
    assert sweep.status(point, spec.eval) == "trained"


def test_noise_draws_make_each_score_a_mean_and_mark_one_draw_scores_stale(tmp_path):
    """[eval] draws = 2: every score is the mean over 2 noise draws, value_sd their spread (summary: draw_sd, and a
    column of summary.md); evaluations stored with one draw are computed again, but adding draws = 1 changes
    nothing stored (its settings are those of a spec without draws)."""
    spec_file = tmp_path / "s0.toml"
    text = 'preset = "ci"\nstages = [0]\n[stage0]\nsteps = 3\n[eval]\nn = 20\nkinds = ["stage0"]\n'
    spec_file.write_text(text)
    spec = sweep.load_spec(spec_file, out=tmp_path / "out")
    r = sweep.run_sweep(spec, sweep.Dispatch("inline"), png=False, log=lambda s: None)
    assert r.failed == {} and all(row["value_sd"] is None for row in r.table)
    assert "sd of one noise draw" not in (tmp_path / "out" / "summary.md").read_text()

    spec_file.write_text(text + "draws = 1\n")
    one = sweep.load_spec(spec_file, out=tmp_path / "out")
    assert one.eval.settings() == spec.eval.settings() and "draws" not in one.eval.settings()  # as stored before
    lines = []
    sweep.run_sweep(one, sweep.Dispatch("inline"), png=False, log=lines.append)
    assert "0 to evaluate" in lines[0], lines

    spec_file.write_text(text + "draws = 2\n")
    lines = []
    r = sweep.run_sweep(sweep.load_spec(spec_file, out=tmp_path / "out"), sweep.Dispatch("inline"), png=False,
                        log=lines.append)
    assert "1 to evaluate" in lines[0], lines
    heun = next(row for row in r.table if row["metric"] == "fid_heun")
    assert json.loads(heun["card"])["draws"] == 2 and heun["value_sd"] > 0
    assert all(row["value_sd"] > 0 for row in r.table if row["metric"] == "dfid")
    summary = next(s for s in r.summary if s["metric"] == "fid_heun")
    assert summary["draw_sd"] == pytest.approx(heun["value_sd"]) and summary["mean"] == pytest.approx(heun["value"])
    assert "| sd of one noise draw |" in (tmp_path / "out" / "summary.md").read_text()


def test_runs_started_from_an_earlier_step_of_their_parent_are_named(tmp_path):
    # stage 1 extended after its stage-2 runs finished: they keep θ0 from the old end of stage 1 and are no longer
    # paired with the control (stage 1 continued from its new end); likewise a stage-1 run started from an earlier
    # stage 0, and with it everything that starts from it. Every sweep call must say which.
    from tcmlab import checkpoint
    spec = sweep.parse_spec(tomllib.loads(GRID_SPEC), "grid.toml", out=tmp_path)
    points = sweep.expand(spec)
    s0 = next(p for p in points if p.kind == "stage0")
    s1 = [p for p in points if p.kind == "stage1"]
    s2 = [p for p in points if p.kind == "stage2" and p.parent == s1[0].id]
    ckpt = lambda p, step: checkpoint.save(Path(p.run_dir) / "latest.safetensors",
                                           {"step": 7, "init_source": {"path": "x", "step": step, "sha256": "x"}})
    for p, step in ((s2[0], 10), (s2[1], 4)):  # stage 1 trains to 10: s2[0] is current, s2[1] stale
        ckpt(p, step)
    assert sweep.init_step(s2[1].run_dir) == 4 and sweep.init_step(s2[2].run_dir) is None
    lines = list(sweep.left_out(points, {}).values())
    assert len(lines) == 1 and lines[0].startswith(f"{s2[1].id} trained against θ0 = {s2[1].parent} at step 4")
    assert list(sweep.left_out(points, {})) == [s2[1].id]  # what report() leaves out of the tables
    logged = []
    sweep.run_sweep(spec, dry_run=True, log=logged.append)
    assert any(line == f"WARNING: {lines[0]}" for line in logged)

    ckpt(s1[1], s0.cfg.train.steps)  # current
    ckpt(s1[0], s0.cfg.train.steps - 1)  # from an earlier stage 0: it, its stage-2 runs and its control are stale
    stale = sweep.left_out(points, {})
    below = {p.id for p in points if p.parent == s1[0].id}
    assert set(stale) == {s1[0].id} | below and len(below) == 5
    assert stale[s1[0].id].startswith(f"{s1[0].id} started from the EMA of {s0.id} at step {s0.cfg.train.steps - 1}")
    assert all(stale[i].endswith("the tables leave it out too") for i in below)
    tasks, _ = sweep.plan(points, spec.eval)  # their scores would never reach the tables: not trained or evaluated
    assert not {t.point.id for t in tasks} & set(stale) and {t.point.id for t in tasks}


def test_summary_groups_seeds_whatever_their_nonfinite_counts():
    # a per-run count (or its absence in an older evaluation) must not split a grid point's seeds
    rows = [{"point": f"seed{s}/s1", "kind": "stage1", "stage": 1, "seed": s, "steps": 10, "metric": "fid_1step",
             "t": None, "value": v, "value_sd": None, "kid_std": None, "n": 50, "nonfinite": nf, "floor": 3.0,
             "floor_n": 50, "card": "{}"} for s, v, nf in ((0, 10.0, ""), (1, 12.0, "0"), (2, 14.0, "3"))]
    (only,) = sweep.summarize(rows)
    assert only["count"] == 3 and only["mean"] == 12.0 and "nonfinite" not in only


def test_evaluation_runs_under_the_runs_own_float32_flags(ci_runs, monkeypatch):
    # an fp32 run is scored with TF32 off, as train()'s own dFID_t rows (docs/decisions.md §19), then flags restored
    import torch

    from tcmlab import evalsets, metrics
    from tcmlab.model import load_model
    seen = []
    from tcmlab.precision import math_flags
    monkeypatch.setattr(metrics, "sample_quality", lambda *a, **k: seen.append(math_flags()["cudnn_tf32"]) or [])
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        metrics.evaluate_run(load_model(ci_runs / "s1"), evalsets.digits_eval_set(), n=20, dfid=False)
        assert seen == [False] and torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_a_finished_run_of_another_config_is_refused_never_relabelled(tmp_path):
    """The spec changed after a point finished: its run is not reused under the new config (nor its JSON rewritten
    with it); the point fails with the sweep's message (what differs; a new out), or train's "cannot be shortened"."""
    spec_file = tmp_path / "s0.toml"
    body = '[eval]\nn = 20\ndfid = false\nkinds = ["stage0"]\n'
    spec_file.write_text('preset = "ci"\nstages = [0]\n[stage0]\nsteps = 2\n' + body)
    quiet = dict(png=False, log=lambda s: None)
    assert inline(spec_file, tmp_path / "out").failed == {}
    point = next(p for p in sweep.expand(sweep.load_spec(spec_file, out=tmp_path / "out")) if p.evaluate)
    stored = point.results_path.read_text()
    for change, message in (('set = { "train.lr" = 0.5 }', "holds a run of another config than the spec now gives "
                             "(differs in: train.lr 0.001 -> 0.5): use a new out"), ("", "cannot be shortened")):
        steps = 2 if change else 1
        spec_file.write_text(f'preset = "ci"\nstages = [0]\n[stage0]\nsteps = {steps}\n{change}\n' + body)
        spec = sweep.load_spec(spec_file, out=tmp_path / "out")
        assert sweep.status(next(p for p in sweep.expand(spec) if p.evaluate), spec.eval) == "changed"
        r = sweep.run_sweep(spec, sweep.Dispatch("inline"), **quiet)
        assert message in r.failed[f"train {point.id}"] and "--allow-change" not in r.failed[f"train {point.id}"]
        assert point.results_path.read_text() == stored  # the finished point's evaluation is untouched
    # extended and changed at once: still another config, not a run to resume
    spec_file.write_text('preset = "ci"\nstages = [0]\n[stage0]\nsteps = 3\nset = { "train.lr" = 0.5 }\n' + body)
    spec = sweep.load_spec(spec_file, out=tmp_path / "out")
    assert sweep.status(next(p for p in sweep.expand(spec) if p.evaluate), spec.eval) == "changed"


def test_runs_below_a_run_of_another_config_leave_every_table(tmp_path):
    # stage 0's lr changed after stage 1 finished from it: stage 0 fails ("changed"), and stage 1, trained from the
    # old stage 0, is no run of this spec either; out holds the old spec's sweep, whose tables stay as they were
    spec_file = tmp_path / "s01.toml"
    body = '[stage1]\nsteps = 2\n[eval]\nn = 20\ndfid = false\nkinds = ["stage1"]\nevery = 1\n'
    spec_file.write_text('preset = "ci"\nstages = [0, 1]\n[stage0]\nsteps = 2\n' + body)
    assert inline(spec_file, tmp_path / "out").failed == {}
    names = ("results.csv", "curves.csv", "timing.csv")
    assert all((tmp_path / "out" / name).exists() for name in names)
    spec_file.write_text('preset = "ci"\nstages = [0, 1]\n[stage0]\nsteps = 2\nset = { "train.lr" = 0.5 }\n' + body)
    spec = sweep.load_spec(spec_file, out=tmp_path / "out")
    before = {name: (tmp_path / "out" / name).read_text() for name in names}
    lines = []
    r = sweep.run_sweep(spec, sweep.Dispatch("inline"), png=False, log=lines.append)
    assert r.states == {"seed0/s0": "changed", "seed0/s1": "done"} and list(r.failed) == ["train seed0/s0"]
    assert any(line.startswith("WARNING: seed0/s1 starts from seed0/s0, whose run was trained with another config")
               for line in lines), lines
    assert r.table == [] and any(line.startswith("nothing run and tables not rebuilt: 1 point(s)") for line in lines)
    assert {name: (tmp_path / "out" / name).read_text() for name in names} == before
    r = sweep.run_sweep(spec, report_only=True, png=False, log=lines.append)
    assert {name: (tmp_path / "out" / name).read_text() for name in names} == before

    # stage 0 extended instead: it trains on and is scored; stage 1 (from its old end) leaves every table
    body = body.replace('kinds = ["stage1"]', 'kinds = ["stage0", "stage1"]')
    spec_file.write_text('preset = "ci"\nstages = [0, 1]\n[stage0]\nsteps = 2\n' + body)
    assert inline(spec_file, tmp_path / "new").failed == {}
    spec_file.write_text('preset = "ci"\nstages = [0, 1]\n[stage0]\nsteps = 3\n' + body)
    r = inline(spec_file, tmp_path / "new")
    assert r.failed == {} and {row["point"] for row in r.table} == {"seed0/s0"}
    assert [row["point"] for row in _read_csv(tmp_path / "new" / "timing.csv")] == ["seed0/s0"]
    assert not (tmp_path / "new" / "curves.csv").exists() and (tmp_path / "new" / "curves.csv.stale").exists()


def test_a_nonfinite_step_in_a_sweep_gives_the_sweeps_advice(tmp_path, nan_loss):
    # train's own advice (--allow-change) has no sweep counterpart: a sweep trains each run under the spec's config
    poison, heal = nan_loss
    poison("edm_loss")
    spec_file = tmp_path / "s0.toml"
    spec_file.write_text('preset = "ci"\nstages = [0]\n[stage0]\nsteps = 2\n[eval]\nkinds = []\n')
    r = inline(spec_file, tmp_path / "out")
    (why,) = r.failed.values()
    assert why.startswith("non-finite loss or gradient at step 0") and "--allow-change" not in why, why
    assert why.endswith("nothing is lost: check the data, or lower this stage's train.lr in the spec and run the "
                        "sweep again.")  # no checkpoint yet: the same out takes the new lr
    spec_file.write_text(spec_file.read_text().replace("[eval]", 'set = { "train.lr" = 1e-4 }\n[eval]'))
    heal("edm_loss")
    with pytest.warns(UserWarning, match="no checkpoint was written under it"):
        r = inline(spec_file, tmp_path / "out")
    assert r.failed == {}


def test_a_sweep_folder_named_by_another_path_is_the_same_sweep(tmp_path):
    # init_from of a stage-1 point is a path under out: moving out (or naming it absolute) re-scores nothing
    spec_file = tmp_path / "s01.toml"
    spec_file.write_text('preset = "ci"\nstages = [0, 1]\n[stage0]\nsteps = 2\n[stage1]\nsteps = 2\n'
                         '[eval]\nn = 20\ndfid = false\nkinds = ["stage1"]\n')
    spec = sweep.load_spec(spec_file, out=tmp_path / "out")
    assert sweep.run_sweep(spec, sweep.Dispatch("inline"), png=False, log=lambda s: None).failed == {}
    shutil.copytree(tmp_path / "out", tmp_path / "moved")
    spec = sweep.load_spec(spec_file, out=tmp_path / "moved")
    assert {sweep.status(p, spec.eval) for p in sweep.expand(spec)} == {"done"}


def test_tables_no_point_is_current_for_are_set_aside_not_left_as_current(tmp_path):
    spec_file = tmp_path / "s0.toml"
    spec_file.write_text('preset = "ci"\nstages = [0]\n[stage0]\nsteps = 2\n[eval]\nn = 20\nkinds = ["stage0"]\n')
    spec = sweep.load_spec(spec_file, out=tmp_path / "out")
    sweep.run_sweep(spec, sweep.Dispatch("inline"), png=False, log=lambda s: None)
    before = (tmp_path / "out" / "results.csv").read_text()
    spec_file.write_text(spec_file.read_text().replace("n = 20", "n = 30"))  # every evaluation now stale
    lines = []
    sweep.run_sweep(sweep.load_spec(spec_file, out=tmp_path / "out"), report_only=True, png=False, log=lines.append)
    assert not (tmp_path / "out" / "results.csv").exists()  # claims cannot read the n = 20 rows as current
    assert (tmp_path / "out" / "results.csv.stale").read_text() == before
    assert any("results.csv.stale" in line for line in lines)


def test_a_2_step_time_at_or_above_T_is_refused_before_any_training(tmp_path):
    spec_file = tmp_path / "t.toml"
    spec_file.write_text('preset = "ci"\nstages = [0, 1]\n[stage1]\nsteps = 2\n[eval]\nt_mid = 200\n')
    with pytest.raises(sweep.SpecError, match=r"\[eval\] t_mid = 200 must be below T = 80 of seed0/s1"):
        sweep.load_spec(spec_file)


def test_a_key_given_twice_in_a_spec_table_is_refused():
    raw = tomllib.loads('preset = "ci"\n[stage2]\nset = { "loss.t_prime" = 0.5, loss.t_prime = 2 }\n')
    with pytest.raises(sweep.SpecError, match="loss.t_prime is given twice"):
        sweep.parse_spec(raw, "x.toml", None)


def test_the_first_stage_of_a_spec_is_checked_against_the_file_its_init_from_names(tmp_path, ci_runs):
    # a spec whose first stage starts from a file (an EDM pickle, a run outside the sweep): another file there makes
    # the points 'changed', never scored under the new spec; the same file moved elsewhere is the same run
    for name in ("a", "b"):
        shutil.copytree(ci_runs / "s1", tmp_path / name)
    (tmp_path / "b" / "latest.safetensors").write_bytes((ci_runs / "s2" / "latest.safetensors").read_bytes())
    spec_file = tmp_path / "s2.toml"
    write = lambda init: spec_file.write_text(f'preset = "ci"\nstages = [2]\n[stage2]\nsteps = 2\nset = {{ "init_from" '
                                              f'= "{init}" }}\n[eval]\nn = 20\ndfid = false\nkinds = ["stage2"]\n')
    write(tmp_path / "a")
    spec = sweep.load_spec(spec_file, out=tmp_path / "out")
    assert sweep.run_sweep(spec, sweep.Dispatch("inline"), png=False, log=lambda s: None).failed == {}
    shutil.copytree(tmp_path / "a", tmp_path / "a_moved")
    write(tmp_path / "a_moved")
    spec = sweep.load_spec(spec_file, out=tmp_path / "out")
    assert {sweep.status(p, spec.eval) for p in sweep.expand(spec)} == {"done"}
    write(tmp_path / "b")  # a stage-2 run whose EMA is another network
    spec = sweep.load_spec(spec_file, out=tmp_path / "out")
    (point,) = sweep.expand(spec)
    assert sweep.status(point, spec.eval) == "changed"
    assert "init_from: the spec names" in sweep.changed_reason(point)
    shutil.rmtree(tmp_path / "a")  # the file the runs started from is gone: the same path is the same run
    write(tmp_path / "a")
    spec = sweep.load_spec(spec_file, out=tmp_path / "out")
    assert {sweep.status(p, spec.eval) for p in sweep.expand(spec)} == {"done"}
    write(tmp_path / "c")  # another path that does not exist either
    spec = sweep.load_spec(spec_file, out=tmp_path / "out")
    (point,) = sweep.expand(spec)
    assert sweep.status(point, spec.eval) == "changed" and "(which does not exist)" in sweep.changed_reason(point)


def test_two_grid_values_that_would_share_a_run_directory_are_refused(tmp_path):
    spec_file = tmp_path / "s.toml"
    spec_file.write_text('preset = "ci"\nstages = [0]\n[stage0]\nsteps = 2\ngrid = { "name" = ["a/b", "a_b"] }\n')
    with pytest.raises(sweep.SpecError, match="share the run directory"):
        sweep.expand(sweep.load_spec(spec_file, out=tmp_path / "out"))


def test_runs_of_kinds_not_evaluated_are_not_evaluated_during_training_either(tmp_path):
    # their curves would be computed and then left out of curves.csv
    spec_file = tmp_path / "k.toml"
    spec_file.write_text('preset = "ci"\ncontrol = true\n[eval]\nn = 20\nevery = 10\nkinds = ["stage2", "control"]\n')
    spec = sweep.load_spec(spec_file, out=tmp_path / "out")
    during = {p.kind: sweep._training_eval(p, spec.eval, None) is not None for p in sweep.expand(spec)}
    assert during == {"stage0": False, "stage1": False, "stage2": True, "control": True}


def test_a_device_or_an_out_that_cannot_work_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    # every task would fail on it (or plan into the working directory): one error line, nothing written
    monkeypatch.chdir(tmp_path)
    for device, message in (("foo", "device 'foo' (--device): Expected one of"),
                            ("cuda:99", "device 'cuda:99' (--device): this machine has ")):
        assert main(["sweep", str(CI_SPEC), "--out", "o", "--workers", "1", "--device", device]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not list(tmp_path.iterdir())
    with pytest.raises(sweep.SpecError, match=r"the output folder \(--out\) is empty"):
        sweep.load_spec(CI_SPEC, out="")
    (tmp_path / "e.toml").write_text('preset = "ci"\nout = " "\n')
    with pytest.raises(sweep.SpecError, match="out must be a folder path"):
        sweep.load_spec(tmp_path / "e.toml")
    (tmp_path / "e.toml").unlink()
    spec = sweep.load_spec(CI_SPEC, out=tmp_path / "o")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sweep.check_device("cuda", here=False)  # SLURM: the jobs' nodes have the GPUs, not this one
    with pytest.raises(ValueError, match="this machine has no CUDA device: give --device cpu"):
        sweep.run_sweep(spec, sweep.Dispatch("inline", device="cuda"), log=lambda s: None)
    assert not list(tmp_path.iterdir())


def test_earlier_scores_and_table_rows_are_set_aside_never_lost(tmp_path):
    """Evaluations replaced under other [eval] settings are kept beside their points (<point>.json.stale, then
    .stale.2: never overwritten), and a table that would lose rows (a grid value gone) is kept as NAME.stale with the
    summary made from it; each said in one line."""
    spec_file = tmp_path / "s0.toml"
    text = ('preset = "ci"\nstages = [0]\n[stage0]\nsteps = 2\ngrid = { "train.lr" = [1e-3, 2e-3] }\n'
            '[eval]\nn = 20\ndfid = false\nkinds = ["stage0"]\n')
    spec_file.write_text(text)
    out = tmp_path / "out"
    assert inline(spec_file, out).failed == {}
    points = [p for p in sweep.expand(sweep.load_spec(spec_file, out=out)) if p.evaluate]
    n20 = {p.id: p.results_path.read_text() for p in points}
    for n, suffix in ((30, ".stale"), (20, ".stale.2")):
        spec_file.write_text(text.replace("n = 20", f"n = {n}"))
        lines = []
        r = inline(spec_file, out, lines.append)
        assert r.failed == {} and {row["n"] for row in r.table} == {n}
        assert sum(line.startswith("2 earlier evaluation(s) (other eval settings, config or step) set aside beside "
                                   "their points as <point>.json.stale") for line in lines) == 1, lines
        for p in points:
            assert json.loads(p.results_path.read_text())["eval"]["n"] == n
    for p in points:  # the n = 20 scores, then the n = 30 ones
        assert Path(f"{p.results_path}.stale").read_text() == n20[p.id]
        assert json.loads(Path(f"{p.results_path}.stale.2").read_text())["eval"]["n"] == 30
    assert not (out / "results.csv.stale").exists()  # the same rows, newly scored: nothing left the table

    before = {name: (out / name).read_text() for name in ("results.csv", "summary.csv", "summary.md")}
    spec_file.write_text(text.replace("2e-3", "4e-3"))  # lr = 2e-3 leaves the grid; its run and JSON stay
    lines = []
    sweep.run_sweep(sweep.load_spec(spec_file, out=out), report_only=True, png=False, log=lines.append)
    assert {row["point"] for row in _read_csv(out / "results.csv")} == {"seed0/s0__lr=0.001"}
    assert {name: (out / f"{name}.stale").read_text() for name in before} == before
    (line,) = [line for line in lines if "results.csv.stale" in line]
    assert line.startswith("results.csv: 2 row(s) of the earlier table are not in this call's (e.g. "
                           "seed0/s0__lr=0.002)")
