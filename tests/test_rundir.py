"""Run directories you can trust: lock, checkpoint-as-truth, failed starts, pinned teacher, metrics.jsonl, load checks,
CLI errors, preemption. Each test was seen to fail on the code before these guarantees existed."""

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch


from tcmlab import checkpoint, rundir
from tcmlab.__main__ import main
from tcmlab.config import TrainConfig, preset
from tcmlab.rundir import DISCARDED_NAME as DISCARDED
from tcmlab.model import load_model, load_state
from tcmlab.train import train

ROOT = Path(__file__).resolve().parents[1]


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def steps_of(run):
    return [r["step"] for r in rundir.read_metrics(Path(run) / "metrics.jsonl") if r["kind"] == "train"]


def test_second_trainer_is_refused_at_once_naming_the_holder(tmp_path, ci_runs):
    cfg = preset("ci", 1, init_from=str(ci_runs / "s0"))
    run = tmp_path / "r"
    train(cfg, run, steps=2, progress=False)
    before = (run / "latest.safetensors").read_bytes()
    with rundir.RunLock(run):  # another trainer holds the directory
        t0 = time.perf_counter()
        with pytest.raises(RuntimeError, match=f"{run} is in use by another trainer \\(pid {os.getpid()}"):
            train(cfg, run, progress=False)
        assert time.perf_counter() - t0 < 5
    assert (run / "latest.safetensors").read_bytes() == before
    assert train(cfg, run, steps=1, progress=False).step == 3  # released: the next trainer proceeds


def test_atomic_writes_use_unique_temporary_names(tmp_path, monkeypatch):
    seen = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append(str(a)), real(a, b)))
    for k in range(2):
        checkpoint.save(tmp_path / "latest.safetensors", {"w": torch.ones(2) * k})
        checkpoint.atomic_write_text(tmp_path / "config.json", "{}")
    assert len(set(seen)) == 4 and not list(tmp_path.glob("*.tmp"))


def test_checkpoint_config_is_the_truth_without_config_json(tmp_path, ci_runs):
    run = tmp_path / "copy"
    shutil.copytree(ci_runs / "s1", run)
    (run / "config.json").unlink()
    before = (run / "latest.safetensors").read_bytes()
    other = preset("ci", 1, init_from=str(ci_runs / "s0"))
    other = dataclasses.replace(other, train=dataclasses.replace(other.train, seed=7))
    with pytest.raises(ValueError, match="holds a different run .*latest.safetensors.*train.seed 0 -> 7"):
        train(other, run, progress=False)
    with pytest.raises(ValueError, match="holds a stage-1 run: give this stage-0 run its own run directory"):
        train(preset("ci", 0), run, progress=False)
    assert (run / "latest.safetensors").read_bytes() == before and not (run / "config.json").exists()


def test_failed_start_leaves_the_directory_as_it_was(tmp_path, ci_runs):
    run = tmp_path / "new"
    with pytest.raises(FileNotFoundError):
        train(preset("ci", 1, init_from=str(tmp_path / "typo")), run, progress=False)
    assert not run.exists()  # nothing was created
    assert train(preset("ci", 1, init_from=str(ci_runs / "s0")), run, steps=2, progress=False).step == 2  # corrected
    snapshot = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and not p.name.startswith(".")}
    bad = dataclasses.replace(preset("ci", 1, init_from=str(ci_runs / "s0")), data=dataclasses.replace(
        preset("ci", 1).data, name="cifar10", root=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="holds a different run"):
        train(bad, run, progress=False)
    assert snapshot == {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and not p.name.startswith(".")}


def test_stage2_teacher_is_pinned_in_the_run(tmp_path, ci_runs):
    s1 = tmp_path / "s1"
    shutil.copytree(ci_runs / "s1", s1)
    cfg = preset("ci", 2, init_from=str(s1))
    train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "split", steps=7, progress=False)
    longer = preset("ci", 1, init_from=str(ci_runs / "s0"))
    train(dataclasses.replace(longer, train=dataclasses.replace(longer.train, steps=30)), s1, progress=False)
    train(cfg, tmp_path / "split", steps=6, progress=False)  # stage 1 moved on: θ0 must not
    shutil.rmtree(s1)  # and then disappeared: resume still works
    train(cfg, tmp_path / "split", progress=False)
    a, b = load_state(tmp_path / "full")[0], load_state(tmp_path / "split")[0]
    assert states_equal(a["model"], b["model"]) and states_equal(a["teacher"], b["teacher"])
    src = b["init_source"]
    assert src["step"] == 20 and len(src["sha256"]) == 64 and src["path"].endswith("latest.safetensors")


def test_metrics_are_cut_back_to_the_checkpoint_on_every_start(tmp_path, ci_runs):
    cfg = preset("ci", 1, init_from=str(ci_runs / "s0"))
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 5}\n{"kind": "train", "step": 10}\n')  # killed
    train(cfg, run, steps=10, progress=False)  # no checkpoint was there: stale rows go
    assert steps_of(run) == [5, 10]
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "step": 15}\n{"kind": "train", "st')  # a row past the checkpoint, a torn line
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        train(cfg, run, progress=False)
    assert any("torn last line" in str(x.message) for x in w)
    assert steps_of(run) == [5, 10, 15, 20]
    cut = rundir.read_metrics(run / "metrics.discarded.jsonl")  # what was cut is kept aside, never lost
    assert [(r["step"], r["resumed_from"]) for r in cut] == [(5, 0), (10, 0), (15, 10)]


def test_the_report_of_the_step_that_failed_goes_with_the_cut_rows(tmp_path):
    # a nonfinite (or fp16_skip) row is logged with the steps done before the attempt: a run that fails on the first
    # step after its checkpoint at 10 logs "nonfinite" at step 10, and resuming from 10 does that step again
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": 10}, {"kind": "fp16_skip", "step": 9}, {"kind": "fp16_skip", "step": 10},
            {"kind": "nonfinite", "step": 10}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rundir.truncate_metrics(path, 10)
    assert rundir.read_metrics(path) == rows[:2]
    assert [{k: v for k, v in r.items() if k != "cut"} for r in rundir.read_metrics(tmp_path / DISCARDED)] == [
        {**r, "resumed_from": 10} for r in rows[2:]]
    path.write_text('{"kind": "nonfinite", "step": 0}\n')  # failed on its first step, before any checkpoint
    rundir.truncate_metrics(path, 0)
    assert rundir.read_metrics(path) == []


def test_a_start_killed_mid_cut_keeps_no_row_twice(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": s} for s in (5, 10, 15, 20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write = rundir.checkpoint.atomic_write_text

    def killed(p, text):
        raise KeyboardInterrupt  # the start dies after the cut rows were appended, before metrics.jsonl is rewritten

    monkeypatch.setattr(rundir.checkpoint, "atomic_write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        rundir.truncate_metrics(path, 10)
    with open(tmp_path / DISCARDED) as fh:  # and one more row had been torn: it is appended again
        kept = fh.readlines()
    (tmp_path / DISCARDED).write_text(kept[0] + kept[1][:9])
    monkeypatch.setattr(rundir.checkpoint, "atomic_write_text", write)
    rundir.truncate_metrics(path, 10)
    assert rundir.read_metrics(path) == rows[:2]
    discarded = (tmp_path / DISCARDED).read_text().splitlines()
    assert [json.loads(l)["step"] for l in discarded if l.endswith("}")] == [15, 20]
    # a deterministic resume that logs the same rows again and is cut again: a second cut, kept
    with open(path, "a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows[2:]))
    rundir.truncate_metrics(path, 10)
    assert [json.loads(l)["step"] for l in (tmp_path / DISCARDED).read_text().splitlines() if l.endswith("}")] == [
        15, 20, 15, 20]
    # killed again mid-cut, and the next start goes back further (its checkpoint deleted): a cut of its own
    with open(path, "a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows[2:]))
    monkeypatch.setattr(rundir.checkpoint, "atomic_write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        rundir.truncate_metrics(path, 10)
    monkeypatch.setattr(rundir.checkpoint, "atomic_write_text", write)
    rundir.truncate_metrics(path, 0)
    assert rundir.read_metrics(path) == []
    lines = (tmp_path / DISCARDED).read_text().splitlines()[-6:]
    cuts = [(r["step"], r["resumed_from"]) for r in map(json.loads, lines)]
    assert cuts == [(15, 10), (20, 10), (5, 0), (10, 0), (15, 0), (20, 0)]  # every row of the file went somewhere


def test_a_bad_metrics_line_names_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=f"{path} line 2"):
        rundir.read_metrics(path)


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, ci_runs):
    run = tmp_path / "r"
    shutil.copytree(ci_runs / "s1", run)
    state = checkpoint.load(run / "latest.safetensors")
    name = next(iter(state["ema"]))
    state["ema"][name] = state["ema"][name] * float("nan")
    checkpoint.save(run / "latest.safetensors", state)
    with pytest.raises(ValueError, match=f"tensor '{name}' holds .* non-finite"):
        load_model(run)
    with pytest.raises(ValueError, match=f"tensor '{name}'"):
        train(preset("ci", 1, init_from=str(ci_runs / "s0")), run, progress=False)
    with pytest.raises(ValueError, match=f"tensor '{name}'"):
        train(preset("ci", 2, init_from=str(run)), tmp_path / "s2", progress=False)


def _flip_byte_of(path: Path, name: str) -> None:
    """Flip one bit in the middle of tensor `name`'s bytes, as a failing disk would: the file stays readable."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    raw[8 + n + (begin + end) // 2] ^= 0x04
    path.write_bytes(bytes(raw))


def test_a_flipped_bit_in_a_checkpoint_is_refused_naming_the_tensor(tmp_path, ci_runs):
    run = tmp_path / "r"
    shutil.copytree(ci_runs / "s1", run)
    ckpt = run / "latest.safetensors"
    metrics_before = (run / "metrics.jsonl").read_bytes()
    _flip_byte_of(ckpt, "s.ema.net.out.weight")  # a small change of one weight: finite, so check_finite passes
    for call in (lambda: load_model(run), lambda: train(preset("ci", 1, init_from=str(ci_runs / "s0")), run,
                                                        steps=20, progress=False)):
        with pytest.raises(checkpoint.ChecksumError, match="'ema.net.out.weight' does not match the checksum .* "
                                                           "Restore it from a copy"):
            call()
    assert (run / "metrics.jsonl").read_bytes() == metrics_before  # a refused start writes nothing
    # the JSON state is covered too: a changed step that still parses
    shutil.copy(ci_runs / "s1" / "latest.safetensors", ckpt)
    raw = ckpt.read_bytes()
    step = load_state(ckpt)[0]["step"]
    old, new = (f'step\\", {k}]'.encode() for k in (step, step + 1 if step % 10 < 9 else step - 1))  # JSON in JSON
    assert old in raw and len(new) == len(old)  # the header keeps its length: only the checksum can tell
    ckpt.write_bytes(raw.replace(old, new))
    with pytest.raises(checkpoint.ChecksumError, match="its JSON state does not match"):
        checkpoint.load(ckpt)


def test_checksums_cover_every_kind_of_tensor_a_checkpoint_holds(tmp_path):
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)  # saved contiguous, hashed as saved
    state = {"bf16": torch.randn(3).bfloat16(), "bool": torch.tensor([True, False]), "empty": torch.zeros(0, 3),
             "scalar": torch.tensor(7.0), "u8": torch.arange(5, dtype=torch.uint8), "cl": x, "step": 3}
    checkpoint.save(tmp_path / "c.safetensors", state)
    back = checkpoint.load(tmp_path / "c.safetensors")
    assert all(torch.equal(back[k], v) for k, v in state.items() if k != "step")
    for name in ("s.bool", "s.bf16"):
        path = tmp_path / f"{name}.safetensors"
        shutil.copy(tmp_path / "c.safetensors", path)
        _flip_byte_of(path, name)
        with pytest.raises(checkpoint.ChecksumError, match=f"'{name[2:]}' does not match"):
            checkpoint.load(path)


def test_a_checkpoint_without_checksums_still_loads(tmp_path):
    from safetensors.torch import save_file  # as tcmlab wrote them before checksums existed

    tensors = {}
    skeleton = checkpoint.flatten({"w": torch.arange(3.0), "step": 4}, "s", tensors)
    save_file(tensors, tmp_path / "old.safetensors", metadata={"tcmlab": json.dumps(skeleton)})
    state = checkpoint.load(tmp_path / "old.safetensors")
    assert state["step"] == 4 and torch.equal(state["w"], torch.arange(3.0))


def test_a_restarted_run_sets_aside_the_scores_and_pictures_of_the_old_state(tmp_path, ci_runs):
    run = tmp_path / "s1"
    cfg = preset("ci", 1, init_from=str(ci_runs / "s0"))
    train(cfg, run, steps=4, progress=False)
    rows = [{"card": {"metric": "fid", "step": s}, "fid": 1.0 * s} for s in (4, 8)]
    rows.insert(1, {"note": "a row without a card is kept"})
    (run / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from tcmlab.viz import png_step, sample_grids

    sample_grids(run, run, t_mid=1.0, n=4, device="cpu")
    assert png_step(run / "samples_1step.png") == 4
    (run / "samples_2step.png").write_bytes(b"not a tcmlab PNG")  # no step recorded: kept, unless from step 0
    with warnings.catch_warnings(record=True) as w:  # resumed at its step 4: the row of step 8 is of another state
        warnings.simplefilter("always")
        train(cfg, run, steps=6, progress=False)
    assert any("1 row(s) of eval.jsonl -> eval.discarded.jsonl" in str(x.message) for x in w)
    assert rundir.read_metrics(run / "eval.jsonl") == rows[:2]
    assert [{k: v for k, v in r.items() if k != "cut"} for r in rundir.read_metrics(run / "eval.discarded.jsonl")] == [
        {**rows[2], "resumed_from": 4}]
    assert png_step(run / "samples_1step.png") == 4  # kept: step 4 is a state this run went through
    assert (run / "samples_2step.png").read_bytes() == b"not a tcmlab PNG"
    (run / "latest.safetensors").unlink()  # e.g. a damaged checkpoint deleted, as its error advises: from step 0
    (run / "samples_2step.png").write_bytes((run / "samples_1step.png").read_bytes())
    shutil.copy(run / "samples_1step.png", run / "samples_1step.discarded-step4.png")  # taken: not overwritten
    with pytest.warns(UserWarning, match="starting from step 0, set aside what was made of a later state: 1 row"):
        train(cfg, run, steps=2, progress=False)
    assert rundir.read_metrics(run / "eval.jsonl") == rows[1:2]
    assert [r["resumed_from"] for r in rundir.read_metrics(run / "eval.discarded.jsonl")] == [4, 0]
    assert not (run / "samples_1step.png").exists() and not (run / "samples_2step.png").exists()
    assert png_step(run / "samples_1step.discarded-step4-2.png") == 4
    assert png_step(run / "samples_2step.discarded-step4.png") == 4
    (run / "eval.jsonl").write_text('{"card": {"step": 9}}\nnot json\n')  # unreadable: a record, left as it is
    with pytest.warns(UserWarning, match="eval.jsonl line 2 is not valid JSON.*Left as it is"):
        train(cfg, run, steps=1, progress=False)
    assert (run / "eval.jsonl").read_text() == '{"card": {"step": 9}}\nnot json\n'


@pytest.mark.parametrize("kw", [dict(lr=float("inf")), dict(lr=float("nan")), dict(ema_beta=float("nan")),
                                dict(betas=(0.9, float("inf")))])
def test_non_finite_numbers_are_refused_on_construction(kw):
    with pytest.raises(ValueError, match="finite"):
        TrainConfig(**kw)


@pytest.mark.parametrize("steps", [0, -5])
def test_steps_must_be_positive(tmp_path, ci_runs, steps, capsys):
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        train(preset("ci", 1, init_from=str(ci_runs / "s0")), tmp_path / "r", steps=steps, progress=False)
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit) as e:
        main(["train", "--preset", "ci", "--stage", "0", "--outdir", str(tmp_path / "r"), "--steps", str(steps)])
    assert e.value.code == 2 and "expected an integer >= 1" in capsys.readouterr().err


def test_evaluate_and_sample_accept_a_checkpoint_file(tmp_path, ci_runs, capsys):
    run = tmp_path / "s1"
    shutil.copytree(ci_runs / "s1", run)
    assert main(["evaluate", str(run / "latest.safetensors"), "--n", "50"]) == 0
    assert (run / "eval.jsonl").exists()
    assert main(["sample", str(run / "latest.safetensors"), "--n", "4"]) == 0
    assert (run / "samples_1step.png").exists()


def cli_error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_cli_turns_expected_failures_into_one_error_line(tmp_path, ci_runs, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "is a file" in cli_error(capsys, "train", "--preset", "ci", "--stage", "0", "--outdir", str(afile))
    assert "init_from must be empty for stage 0" in cli_error(
        capsys, "train", "--preset", "ci", "--stage", "0", "--outdir", str(tmp_path / "a"), "--init-from", "x")
    bad = tmp_path / "badcfg"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    assert "config.json is not a valid tcmlab config" in cli_error(
        capsys, "train", "--preset", "ci", "--stage", "0", "--outdir", str(bad))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "latest.safetensors").write_bytes(b"\0" * 40)
    assert "damaged" in cli_error(capsys, "evaluate", str(damaged))
    assert "--set" in cli_error(capsys, "train", "--preset", "ci", "--stage", "0", "--outdir", str(tmp_path / "b"),
                                "--set", "train.nope=1")
    import tcmlab.__main__ as cli
    for exc, text in ((PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro")), "permission denied"),
                      (OSError(errno.ENOSPC, "No space left on device", "latest.safetensors"), "no space left")):
        def boom(*a, exc=exc, **k):
            raise exc
        monkeypatch.setattr(cli, "train", boom)
        assert text in cli_error(capsys, "train", "--preset", "ci", "--stage", "0", "--outdir", str(tmp_path / "c"))
        with pytest.raises(type(exc)):
            main(["--debug", "train", "--preset", "ci", "--stage", "0", "--outdir", str(tmp_path / "c")])
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(ci_runs / "s1"), "--n", "0"])
    assert e.value.code == 2


def test_a_stopped_slice_says_how_to_resume_to_the_end(tmp_path, ci_runs):
    # "the same command" with --steps k trains k more steps from wherever it stopped, never to the planned end
    from tcmlab.train import Interrupted
    cfg = preset("ci", 1, init_from=str(ci_runs / "s0"))
    sent = []

    def stop(row):
        if row.get("kind") == "train" and not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))

    with pytest.raises(Interrupted) as e:
        train(cfg, tmp_path / "r", steps=cfg.train.steps - 1, progress=False, on_log=stop)
    assert f"Run it again without --steps (python: steps=None) to resume (to step {cfg.train.steps})" in str(e.value)
    with pytest.raises(Interrupted) as e:
        sent.clear()
        train(cfg, tmp_path / "r", progress=False, on_log=stop)
    assert str(e.value).endswith(f"Run the same command again to resume (to step {cfg.train.steps}).")


def test_evaluate_never_follows_a_data_path_stored_in_a_checkpoint(tmp_path, ci_runs, capsys):
    run = tmp_path / "forged"
    shutil.copytree(ci_runs / "s1", run)
    state = checkpoint.load(run / "latest.safetensors")
    cfg = json.loads(state["config"])
    cfg["data"].update(name="cifar10", root=str(tmp_path / "crafted"))
    state["config"] = json.dumps(cfg)
    checkpoint.save(run / "latest.safetensors", state)
    err = cli_error(capsys, "evaluate", str(run))
    assert "--data-root" in err and str(tmp_path / "crafted") in err


def test_sigterm_checkpoints_and_the_same_command_resumes(tmp_path, ci_runs):
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "tcmlab", "train", "--preset", "ci", "--stage", "1", "--outdir", str(run),
           "--init-from", str(ci_runs / "s0"), "--set", "train.steps=100000", "--set", "train.ckpt_every=100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or not steps_of(run):
        assert p.poll() is None and time.time() < deadline, p.stderr.read() if p.poll() is not None else "timeout"
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM after step" in err and "Run the same command again to resume" in err
    step = load_state(run)[0]["step"]
    assert step >= 5 and steps_of(run)[-1] <= step
    r = subprocess.run(cmd[:-4] + ["--set", "train.steps=100000", "--set", "train.ckpt_every=100000",
                                   "--steps", "3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert load_state(run)[0]["step"] == step + 3


def test_stage2_checkpoint_without_teacher_copy_resumes_from_init_from(tmp_path, ci_runs):
    run = tmp_path / "old"
    cfg = preset("ci", 2, init_from=str(ci_runs / "s1"))
    train(cfg, run, steps=3, progress=False)
    state = checkpoint.load(run / "latest.safetensors")
    del state["teacher"]  # as written before θ0 was kept in the run
    checkpoint.save(run / "latest.safetensors", state)
    with pytest.warns(UserWarning, match="holds no copy of θ0"):
        train(cfg, run, steps=2, progress=False)
    after = load_state(run)[0]
    assert after["step"] == 5 and states_equal(after["teacher"], load_state(ci_runs / "s1")[0]["ema"])


def test_stage2_from_an_unfinished_stage1_says_so(tmp_path, ci_runs):
    cfg1 = preset("ci", 1, init_from=str(ci_runs / "s0"))
    train(cfg1, tmp_path / "s1", steps=3, progress=False)  # stopped at 3 of its train.steps
    with pytest.warns(UserWarning, match=r"is at step 3 of its \d+: this stage starts from its EMA at step 3"):
        train(preset("ci", 2, init_from=str(tmp_path / "s1")), tmp_path / "s2", steps=1, progress=False)
    assert load_state(tmp_path / "s2")[0]["init_source"]["step"] == 3


def test_init_from_is_not_part_of_a_checkpointed_run(tmp_path, ci_runs, monkeypatch):
    # the same stage-1 folder named relative to another working directory, or moved, is the same run once the
    # checkpoint holds it (init_from is not read again; init_source records the origin)
    import os
    s1 = tmp_path / "s1"
    shutil.copytree(ci_runs / "s1", s1)
    cfg = preset("ci", 2, init_from=str(s1))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=4))
    train(cfg, tmp_path / "s2", steps=2, progress=False)
    monkeypatch.chdir(tmp_path / "s2")
    rel = dataclasses.replace(cfg, init_from=os.path.relpath(s1))  # "../s1"
    with pytest.warns(UserWarning, match=r"init_from .* -> '\.\./s1' \(not read"):
        assert train(rel, tmp_path / "s2", progress=False).step == 4
    assert load_state(tmp_path / "s2")[0]["init_source"]["path"] == str(s1 / "latest.safetensors")
    # the run keeps its own init_from (a wrong path given on resume is not written into its config)
    assert load_state(tmp_path / "s2")[1].init_from == str(s1)
    assert json.loads((tmp_path / "s2" / "config.json").read_text())["init_from"] == str(s1)
    with pytest.raises(ValueError, match="train.lr"):  # everything else still has to match
        train(dataclasses.replace(rel, train=dataclasses.replace(rel.train, steps=5, lr=1.0)), tmp_path / "s2",
              progress=False)


def test_a_data_set_mounted_elsewhere_is_the_same_run(tmp_path, ci_runs):
    # data.root is where the data lies, not what it is: a resume with the data moved goes on, with a warning
    run = tmp_path / "s0"
    shutil.copytree(ci_runs / "s0", run)
    cfg = load_state(run)[1]
    moved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root="/mnt/elsewhere"),
                                train=dataclasses.replace(cfg.train, steps=cfg.train.steps + 1))
    with pytest.warns(UserWarning, match="continuing with data.root 'data/downloads' -> '/mnt/elsewhere'"):
        assert train(moved, run, progress=False).step == cfg.train.steps + 1
    assert load_state(run)[1].data.root == "/mnt/elsewhere"


def test_a_stage_2_pointed_at_its_teachers_folder_is_told_so_not_to_delete_it(tmp_path, ci_runs):
    s1 = tmp_path / "s1"
    shutil.copytree(ci_runs / "s1", s1)
    before = (s1 / "latest.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"s1 holds a stage-1 run \(the run this stage starts from\): give this "
                                         r"stage-2 run its own run directory") as e:
        train(preset("ci", 2, init_from=str(s1)), s1, progress=False)
    assert "delete" not in str(e.value) and (s1 / "latest.safetensors").read_bytes() == before
    with pytest.raises(ValueError, match="config.json is not a tcmlab checkpoint .* give a run directory"):
        train(preset("ci", 2, init_from=str(s1 / "config.json")), tmp_path / "s2", progress=False)


def test_a_stop_signal_during_the_final_save_waits_for_it(tmp_path, ci_runs, monkeypatch):
    # a scheduler's SIGTERM (here SIGINT, which pytest survives) while the last checkpoint is written: the save
    # finishes, and the steps since the previous checkpoint are kept
    cfg = preset("ci", 1, init_from=str(ci_runs / "s0"))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=5, ckpt_every=3))
    real = checkpoint.save

    def save(path, state):
        if state["step"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        real(path, state)

    monkeypatch.setattr(checkpoint, "save", save)
    try:
        assert train(cfg, tmp_path / "r", progress=False).step == 5
    except KeyboardInterrupt:
        pytest.fail("the final save was not protected from the signal")
    assert load_state(tmp_path / "r")[0]["step"] == 5 and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_stop_signal_during_the_last_step_ends_the_call_as_finished(tmp_path, ci_runs):
    cfg = preset("ci", 1, init_from=str(ci_runs / "s0"))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=4, log_every=1))

    def on_log(row):
        if row.get("kind") == "train" and row["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)

    try:
        assert train(cfg, tmp_path / "r", progress=False, on_log=on_log).step == 4
    except KeyboardInterrupt as e:  # train.Interrupted is one
        pytest.fail(f"a finished call reported as stopped: {e}")
    assert load_state(tmp_path / "r")[0]["step"] == 4


def test_a_finished_run_called_with_other_free_or_unread_fields_keeps_its_checkpoint(tmp_path, ci_runs):
    # the bytes stay, so a stage 2 paired with it (init_source's sha256) stays paired
    run = tmp_path / "s1"
    shutil.copytree(ci_runs / "s1", run)
    before = (run / "latest.safetensors").read_bytes()
    cfg = preset("ci", 1, init_from=str(ci_runs / "s0"))
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, log_every=3, ckpt_every=7),
                                net=dataclasses.replace(cfg.net, channel_mult=(1, 2)))  # an MLP reads no channel_mult
    for _ in range(2):
        with pytest.warns(UserWarning, match="continuing with train.log_every"):
            assert train(other, run, progress=False).step == cfg.train.steps
    assert (run / "latest.safetensors").read_bytes() == before
    # and no record of a change that was not made: config.json is the checkpoint's, no config_change row
    assert json.loads((run / "config.json").read_text())["train"]["log_every"] == cfg.train.log_every
    assert "config_change" not in {r["kind"] for r in rundir.read_metrics(run / "metrics.jsonl")}
    with pytest.warns(UserWarning, match="continuing with train.lr"):
        train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=1e-4)), run, progress=False,
              allow_change=("train.lr",))
    assert load_state(run)[1].train.lr == 1e-4  # a change of the run itself is saved


def test_a_recovery_change_is_saved_before_its_row(tmp_path, ci_runs, nan_loss):
    # the config_change row never outlives the change: a call that fails before its next checkpoint leaves both
    from tcmlab.train import NonFiniteError

    cfg = preset("ci", 1, init_from=str(ci_runs / "s0"))
    train(cfg, tmp_path / "r", steps=3, progress=False)
    poison, _ = nan_loss
    poison("ect_loss")
    lower = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=cfg.train.lr / 10))
    with pytest.warns(UserWarning, match="continuing with train.lr"), pytest.raises(NonFiniteError, match="step 3"):
        train(lower, tmp_path / "r", progress=False, allow_change=("train.lr",))
    state, stored = load_state(tmp_path / "r")
    assert state["step"] == 3 and stored.train.lr == lower.train.lr
    rows = rundir.read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [r["kind"] for r in rows if r["step"] == 3][-2:] == ["config_change", "nonfinite"]


def test_a_metrics_row_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match="line 2 is JSON but not an object"):
        rundir.read_metrics(path)


def test_a_write_to_a_folder_or_into_a_missing_folder_names_the_path(tmp_path, capsys):
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a folder: give a file name"):
        checkpoint.atomic_write_text(tmp_path, "x")
    with pytest.raises(FileNotFoundError, match="the folder .*nowhere does not exist"):
        checkpoint.atomic_write_text(tmp_path / "nowhere" / "report.md", "x")
    assert main(["claims", str(ROOT / "sweeps" / "ci.toml"), "--md", str(tmp_path)]) == 2  # not a temporary's name
    assert main(["sweep", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"sweep spec {tmp_path} is a folder, not a file" in err


def test_a_run_shortened_to_its_step_is_saved_as_finished(tmp_path, ci_runs):
    # nothing to train, but the run itself changed (train.steps 20 -> 15): the checkpoint records it
    cfg = preset("ci", 1, init_from=str(ci_runs / "s0"))
    train(cfg, tmp_path / "r", steps=15, progress=False)
    short = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=15))
    assert train(short, tmp_path / "r", progress=False).step == 15
    assert load_state(tmp_path / "r")[1].train.steps == 15


def test_sample_grids_are_written_as_a_pair_or_not_at_all(tmp_path, ci_runs, monkeypatch):
    # a full disk while the second grid is written must not leave a truncated PNG, nor a new 1-step grid beside an
    # old 2-step one
    from tcmlab.viz import SAMPLE_NAMES, png_step, sample_grids

    sample_grids(ci_runs / "s1", tmp_path, t_mid=1.0, n=4, device="cpu")
    before = {name: (tmp_path / name).read_bytes() for name in SAMPLE_NAMES}
    calls, fsync = [], os.fsync

    def full_disk(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        sample_grids(ci_runs / "s2", tmp_path, t_mid=1.0, n=9, seed=3, device="cpu")
    assert {name: (tmp_path / name).read_bytes() for name in SAMPLE_NAMES} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SAMPLE_NAMES)  # no temporary file left
    monkeypatch.setattr(os, "fsync", fsync)
    sample_grids(ci_runs / "s2", tmp_path, t_mid=1.0, n=9, seed=3, device="cpu")
    assert all(png_step(tmp_path / name) == 20 for name in SAMPLE_NAMES)


def test_a_full_disk_during_a_checkpoint_save_is_named_as_one(tmp_path, monkeypatch, capsys):
    # safetensors reports I/O errors as SafetensorError("... (os error 28)"): the CLI must say "no space left"
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OSError) as e:
        checkpoint.save(tmp_path / "latest.safetensors", {"w": torch.zeros(2)})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "latest.safetensors")
    assert list(tmp_path.iterdir()) == []  # nothing left behind
    assert main(["train", "--preset", "ci", "--stage", "0", "--outdir", str(tmp_path / "r")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: no space left on the device writing") and str(tmp_path / "r") in last
