"""Training under torchrun: the CLI verbatim, 2 CPU processes (gloo) = 1 process, one metrics stream."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tcmlab import rundir
from tcmlab.__main__ import build_parser
from tcmlab.config import preset, with_overrides
from tcmlab.model import load_state
from tcmlab.train import train

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["train.steps=6", "train.log_every=2", "net.dropout=0.0"]  # no dropout: masks are drawn per rank


def test_cli_options_do_not_collide_with_torchruns():
    from torch.distributed.run import get_args_parser
    ours = ["train", "--preset", "ci", "--stage", "1", "--outdir", "r", "--init-from", "s0", "--steps", "3",
            "--set", "train.batch=64", "--device", "cpu"]
    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node=2", "-m", "tcmlab", *ours])
    assert args.training_script == "tcmlab" and args.training_script_args == ours
    assert build_parser().parse_args(ours).outdir == "r"


@pytest.mark.parametrize("stage", [1, 2])
def test_two_processes_under_torchrun_match_one(tmp_path, ci_runs, stage):
    init = ci_runs / ("s0" if stage == 1 else "s1")
    cfg = with_overrides(preset("ci", stage, init_from=str(init)), OVERRIDES)
    train(cfg, tmp_path / "one", progress=False)
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        "-m", "tcmlab", "train", "--preset", "ci", "--stage", str(stage), "--outdir",
                        str(tmp_path / "two"), "--init-from", str(init), "--device", "cpu", *sets],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_state(tmp_path / "one")[0], load_state(tmp_path / "two")[0]
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-6), k
    one = rundir.read_metrics(tmp_path / "one" / "metrics.jsonl")
    two = rundir.read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [2, 4, 6]  # one stream, written by rank 0
    assert {r["world"] for r in one} == {1} and {r["world"] for r in two} == {2}  # really two ranks
    for x, y in zip(one, two):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
        assert y["images_seen"] == x["images_seen"] == x["step"] * cfg.train.batch  # the global batch, not a rank's
        assert y["device_seconds"] == 2 * y["train_seconds"]  # two processes for that wall-clock time
        if stage == 2:  # diagnostics are reduced over both ranks' rows
            assert y["teacher_rows"] == x["teacher_rows"]
            assert y["loss_boundary"] == pytest.approx(x["loss_boundary"], rel=1e-4)
            assert y["loss_consistency"] == pytest.approx(x["loss_consistency"], rel=1e-4)


def test_resuming_on_more_ranks_gives_each_rank_its_own_dropout_stream(tmp_path, ci_runs):
    # written by 1 process, resumed by 2: rank 1 must not take rank 0's saved RNG state (the same dropout masks for
    # the same rows of both slices)
    cfg = with_overrides(preset("ci", 1, init_from=str(ci_runs / "s0")), ["train.steps=4", "train.log_every=2"])
    train(cfg, tmp_path / "r", steps=2, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        "-m", "tcmlab", "train", "--preset", "ci", "--stage", "1", "--outdir", str(tmp_path / "r"),
                        "--init-from", str(ci_runs / "s0"), "--device", "cpu", "--set", "train.steps=4", "--set",
                        "train.log_every=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming on 2 rank(s) from a checkpoint written by 1" in r.stderr
    state = load_state(tmp_path / "r")[0]
    rng = state["rng"]["torch"]
    assert state["step"] == 4 and len(rng) == 2 and not torch.equal(rng[0], rng[1])


def test_train_torchrun_stops_its_trainers_when_the_caller_stops(tmp_path, ci_runs, monkeypatch):
    # an exception from on_log (a live plot) or a KeyboardInterrupt must not leave torchrun training on, orphaned,
    # holding the run directory's lock
    from tcmlab import launch
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = with_overrides(preset("ci", 1, init_from=str(ci_runs / "s0")), ["train.steps=100000", "train.log_every=1"])

    def on_log(row):
        if row.get("kind") == "train":
            raise RuntimeError("plot broke")
    with pytest.raises(RuntimeError, match="plot broke"):
        launch.train_torchrun(cfg, tmp_path / "r", 2, on_log=on_log, poll=0.2)
    state = load_state(tmp_path / "r")[0]  # the trainers checkpointed on SIGTERM
    assert 0 < state["step"] < 100000
    with pytest.warns(UserWarning, match="resuming on 1 rank"):
        r = train(cfg, tmp_path / "r", steps=1, progress=False)  # the lock is free: nobody trains there any more
    assert r.step == state["step"] + 1



def test_all_reduce_max_gives_every_rank_the_largest(tmp_path):
    # peak_memory_mib in the metrics rows: the largest over the ranks, not rank 0's
    script = tmp_path / "max.py"
    script.write_text("import pathlib, sys\nfrom tcmlab.distributed import all_reduce_max, process_group\n"
                      "with process_group('cpu') as (rank, world, device):\n"
                      "    value = all_reduce_max([3.0, 7.5][rank], device)\n"
                      "    pathlib.Path(sys.argv[1], f'rank{rank}').write_text(f'{world} {value}')\n")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script), str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]  # each rank writes its own file: printed lines interleave
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["2 7.5", "2 7.5"]


def test_a_failed_torchrun_names_the_trainers_error_first(tmp_path, ci_runs, monkeypatch):
    # torchrun's own summary (tens of lines, no cause) must not push the trainers' `error:` line out of the message
    from tcmlab import launch
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = preset("ci", 1, init_from=str(ci_runs / "s0"))  # its batch of 64 does not split over 3 processes
    with pytest.raises(RuntimeError) as failed:
        launch.train_torchrun(cfg, tmp_path / "r", 3, poll=0.2)
    first = str(failed.value).split("\n")[1]
    assert first.startswith("error: ") and "divisible by the number of processes (3)" in first, str(failed.value)


RANKS_SCRIPT = '''
import datetime, json, sys, time
from pathlib import Path
import torch.distributed as dist
import tcmlab.stages as stages
from tcmlab.config import preset, with_overrides
from tcmlab.model import load_state
from tcmlab.train import NonFiniteError, train

root, s0 = Path(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=15))  # used as it is by train()
rank = dist.get_rank()
cfg = with_overrides(preset("ci", 1, init_from=s0), ["train.steps=4", "train.log_every=2", "train.ckpt_every=100"])
said = []
# 1. a node that does not see rank 0's run directory (no shared file system) must not start over on its own
try:
    train(cfg, root / ("ahead" if rank == 0 else "elsewhere"), progress=False)
except ValueError as e:
    said.append(str(e))
# 2. rank 0's evaluation outlasts the group's timeout (15 s): the other rank waits for it; a checkpoint comes first
def slow(step, ema):
    saved = load_state(root / "ev")[0]["step"]  # the state being evaluated is on disk (ckpt_every is 100)
    time.sleep(20)
    return {"saved": saved}
r = train(cfg, root / "ev", progress=False, eval_fn=slow, eval_every=4)
said.append(f"ev {r.step}")
# 3. non-finite per-sample losses on rank 1 only: the report counts every rank's
real = stages.ect_loss
def poisoned(*a, **k):
    out = real(*a, **k)
    if rank == 1:
        out.per_sample = out.per_sample.clone()
        out.per_sample[:3] = float("nan")
        out.loss = out.loss * float("nan")
    return out
stages.ect_loss = poisoned
try:
    train(cfg, root / "nan", progress=False)
except NonFiniteError:
    said.append("nonfinite")
stages.ect_loss = real
# 4. rank 0's evaluation fails: every rank raises (the others do not wait for it until the group's timeout)
def fails(step, ema):
    raise ArithmeticError("evaluation failed")
try:
    train(cfg, root / "evfail", progress=False, eval_fn=fails, eval_every=2)
except Exception as e:
    said.append(f"{type(e).__name__}: {e}")
(root / f"rank{rank}.json").write_text(json.dumps(said))
dist.destroy_process_group()
'''


def test_ranks_agree_on_the_checkpoint_wait_for_evaluations_and_count_all_nonfinite_rows(tmp_path, ci_runs):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    cfg = with_overrides(preset("ci", 1, init_from=str(ci_runs / "s0")),
                         ["train.steps=4", "train.log_every=2", "train.ckpt_every=100"])
    train(cfg, tmp_path / "ahead", steps=2, progress=False)  # rank 0's run directory, which rank 1 will not see
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script), str(tmp_path), str(ci_runs / "s0")], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    said = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for s in said:  # every rank refused, named both ranks' steps and said what to do
        assert "read different checkpoints" in s[0] and "rank 0: step 2, rank 1: none" in s[0] and "share" in s[0]
        assert s[1:3] == ["ev 4", "nonfinite"]
    assert said[0][3] == "ArithmeticError: evaluation failed"
    assert said[1][3] == "RuntimeError: rank 0's evaluation at step 2 failed (its error is in its output)"
    assert load_state(tmp_path / "evfail")[0]["step"] == 2  # saved before the evaluation
    assert load_state(tmp_path / "ahead")[0]["step"] == 2  # nothing trained on
    rows = rundir.read_metrics(tmp_path / "ev" / "metrics.jsonl")
    assert [r["kind"] for r in rows] == ["train", "train", "eval"] and rows[-1]["saved"] == 4
    (report,) = [r for r in rundir.read_metrics(tmp_path / "nan" / "metrics.jsonl") if r["kind"] == "nonfinite"]
    assert report["nonfinite_samples"] == 3  # rank 1's rows (rank 0's were finite)
