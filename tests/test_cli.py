import pytest

from tcmlab.__main__ import main


def test_tiny_end_to_end_demo(tmp_path, capsys):
    assert main(["demo", "--preset", "ci", "--out", str(tmp_path)]) == 0
    for stage in ("stage1", "stage2"):
        for steps in ("1step", "2step"):
            assert (tmp_path / stage / f"samples_{steps}.png").stat().st_size > 100
    assert str(tmp_path) in capsys.readouterr().out


def test_cli_reports_bad_input(tmp_path, capsys):
    assert main(["train", "--preset", "ci", "--stage", "2", "--outdir", str(tmp_path / "r")]) == 2
    assert "init_from" in capsys.readouterr().err
    import json
    from tcmlab.config import preset, to_dict
    d = to_dict(preset("ci", 0))
    d["train"]["learning_rate"] = 1e-5  # a typo in a hand-written config is refused, not dropped
    (tmp_path / "c.json").write_text(json.dumps(d))
    assert main(["train", "--config", str(tmp_path / "c.json"), "--outdir", str(tmp_path / "r")]) == 2
    assert "unknown config field(s) train.learning_rate" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_evaluate_writes_cards(ci_runs, capsys):
    import json
    assert main(["evaluate", str(ci_runs / "s2"), "--n", "200"]) == 0
    rows = [json.loads(l) for l in (ci_runs / "s2" / "eval.jsonl").read_text().splitlines()]
    kinds = [(r["card"]["metric"], tuple(r["card"]["steps"])) for r in rows]
    assert ("fid", (80.0,)) in kinds and ("fid", (80.0, 1.0)) in kinds and ("dfid", (1.0,)) in kinds
    assert "floor" in capsys.readouterr().out


def test_evaluate_with_noise_draws_reports_their_mean_and_spread(ci_runs, tmp_path, capsys):
    import json
    import shutil
    import statistics
    run = tmp_path / "s1"
    shutil.copytree(ci_runs / "s1", run)
    (run / "eval.jsonl").unlink(missing_ok=True)
    assert main(["evaluate", str(run), "--n", "100", "--draws", "2"]) == 0
    rows = [json.loads(l) for l in (run / "eval.jsonl").read_text().splitlines()]
    assert {r["card"]["draws"] for r in rows} == {2} and all(len(r["fid_draws"]) == 2 for r in rows)
    one = rows[0]
    out = capsys.readouterr().out
    assert "mean over 2 noise draws" in out
    assert f"FID 1-step (80) {one['fid']:.2f} ± {statistics.stdev(one['fid_draws']):.1f}" in out


def test_evaluate_of_a_stage0_run_uses_the_heun_sampler(ci_runs, tmp_path, capsys):
    import json
    import shutil
    run = tmp_path / "s0"
    shutil.copytree(ci_runs / "s0", run)  # a copy: eval.jsonl of the shared session runs stays as it is
    (run / "eval.jsonl").unlink(missing_ok=True)
    assert main(["evaluate", str(run), "--n", "200", "--heun-steps", "5"]) == 0
    rows = [json.loads(l) for l in (run / "eval.jsonl").read_text().splitlines()]
    assert sorted({r["card"]["metric"] for r in rows}) == ["dfid", "fid_heun"]  # no 1-/2-step rows for stage 0
    heun = [r for r in rows if r["card"]["metric"] == "fid_heun"]
    assert len(heun) == 1 and len(heun[0]["card"]["steps"]) == 5 and heun[0]["card"]["steps"][0] == 80.0
    assert heun[0]["floor_n"] == 200 and heun[0]["fid"] > 0
    out = capsys.readouterr().out
    assert "FID Heun, EDM grid of 5 times (9 calls of D)" in out and "1-step" not in out


def test_train_scores_dfid_at_the_t_prime_a_stage_2_will_use(tmp_path, ci_runs, capsys):
    # what notebook 02's stage 1 passes under torchrun: the grid, then t′ (metrics.dfid_ts_for)
    import json
    args = ["train", "--preset", "ci", "--stage", "1", "--init-from", str(ci_runs / "s0"), "--outdir",
            str(tmp_path / "s1"), "--steps", "2", "--dfid-every", "2", "--dfid-n", "50"]
    assert main(args + ["--dfid-t-prime", "80"]) == 2
    assert "--dfid-t-prime must be in (0, T=80)" in capsys.readouterr().err
    assert main(args + ["--dfid-t-prime", "3.5"]) == 0
    rows = [json.loads(l) for l in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    from tcmlab.metrics import dfid_ts_for
    levels = next(r for r in rows if r["kind"] == "eval")["dfid"]
    assert sorted(map(float, levels)) == sorted(dfid_ts_for(80.0, 3.5)) and 3.5 not in dfid_ts_for(80.0)


def test_set_without_an_equals_sign_says_so_not_did_you_mean(capsys):
    assert main(["train", "--preset", "ci", "--stage", "1", "--set", "train.steps", "--outdir", "/nonexistent/x"]
                ) == 2
    err = capsys.readouterr().err
    assert "expected field=value, with '=' between the field and its value" in err and "Did you mean" not in err


def test_ctrl_c_names_only_what_the_command_writes(monkeypatch, capsys):
    import tcmlab.__main__ as cli

    def stop(args):
        raise KeyboardInterrupt

    for cmd, says in (("train", "train interrupted (Ctrl-C); run the same command again."),
                      ("evaluate", "evaluate interrupted (Ctrl-C); eval.jsonl gets a row only when")):
        monkeypatch.setattr(cli, f"cmd_{cmd}", stop)
        args = (["train", "--preset", "ci", "--stage", "1", "--outdir", "/nonexistent/x"] if cmd == "train"
                else ["evaluate", "/nonexistent/run"])
        assert main(args) == 130
        err = capsys.readouterr().err
        assert says in err and (cmd != "train" or "eval.jsonl" not in err), err


def test_t_mid_outside_0_T_is_named_as_the_option(ci_runs, tmp_path, capsys):
    assert main(["sample", str(ci_runs / "s1"), "--t-mid", "200", "--out", str(tmp_path), "--n", "4"]) == 2
    assert "t_mid=200 (--t-mid) must be in (0, T=80) of this model" in capsys.readouterr().err


def test_evaluate_says_when_t_mid_is_raised_to_t_prime(ci_runs, capsys):
    assert main(["evaluate", str(ci_runs / "s2"), "--n", "20", "--t-mid", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "--t-mid 0.5 is below t′ = 1 of this stage-2 model" in out and "2-step (80 → 1)" in out


def test_evaluate_refuses_t_mid_outside_0_T_before_scoring(ci_runs, capsys, monkeypatch):
    from tcmlab import metrics

    monkeypatch.setattr(metrics, "dfid_scores", lambda *a, **k: pytest.fail("scored before the t_mid check"))
    assert main(["evaluate", str(ci_runs / "s1"), "--n", "20", "--t-mid", "200"]) == 2
    assert "t_mid=200 (--t-mid) must be in (0, T=80)" in capsys.readouterr().err


def test_info_says_what_a_run_holds_and_catches_a_damaged_or_moved_teacher(ci_runs, tmp_path, capsys):
    import json
    import shutil
    from tcmlab.config import preset, with_overrides
    from tcmlab.train import train

    s1 = tmp_path / "s1"
    shutil.copytree(ci_runs / "s1", s1)
    run = tmp_path / "s2"
    cfg = with_overrides(preset("ci", 2, init_from=str(s1)), ["loss.t_prime=0.5"])
    train(cfg, run, steps=10, progress=False)
    assert main(["evaluate", str(run), "--n", "50"]) == 0
    assert main(["evaluate", str(run), "--n", "40", "--raw"]) == 0  # another card: listed apart, not in its place
    with open(run / "metrics.jsonl", "a") as fh:  # a stopped call's rows past the checkpoint
        fh.write('{"kind": "train", "step": 15, "loss": 1.0, "grad_norm": 1.0}\n{"kind": "nonfinite", "step": 15}\n')
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert main(["info", str(run), "--verify-init"]) == 0
    out = capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # read-only: nothing written or added
    assert f"{run}: step 10 of 20 (10 steps to go);" in out and "checksums ok" in out
    assert "stage 2 (TCM truncated training), preset 'ci': differs from the preset in loss.t_prime 1.0 -> 0.5" in out
    assert f"started from {s1 / 'latest.safetensors'} at its step 20" in out and "now: same file)" in out
    assert "compute: 640 images seen" in out  # 10 steps of the global batch of 64
    assert "last train row, step 10:" in out  # not the row of step 15, which the checkpoint has not reached
    assert "after the checkpoint's step (a stopped call; set aside when the run resumes): 1 nonfinite, 1 train" in out
    ema, raw = out.index("(n = 50, ema weights, seed 0, extractor tcmlab-digits-cnn) FID 1-step (80): "), out.index(
        "(n = 40, raw weights, seed 0")
    assert ema < raw and "FID 2-step (80 → 1)" in out and "dFID_t at t = 0.05: " in out
    d = json.loads((main(["info", str(run), "--json"]), capsys.readouterr().out)[1])
    assert d["step"] == 10 and d["compute"]["since_step"] == 0 and d["metrics"]["reported"] == {}
    assert [e["weights"] for e in d["eval"]].count("raw") == 12  # 1-/2-step FID and dFID_t at 10 levels
    train(cfg, run, steps=1, progress=False)  # a resume sets the stopped call's rows aside
    assert main(["info", str(run)]) == 0
    assert "set aside by earlier resumes (metrics.discarded.jsonl): 1 nonfinite, 1 train" in capsys.readouterr().out
    s1_ckpt = s1 / "latest.safetensors"
    raw = bytearray(s1_ckpt.read_bytes())
    raw[-1] ^= 1
    s1_ckpt.write_bytes(bytes(raw))  # the teacher's file changed since stage 2 started
    assert main(["info", str(run), "--verify-init"]) == 0
    assert "now: changed (sha256 now " in capsys.readouterr().out
    assert main(["info", str(s1)]) == 2  # and that file itself is refused, named
    err = capsys.readouterr().err
    assert f"checkpoint {s1_ckpt} is damaged" in err and "does not match the checksum" in err


def test_info_finds_a_relative_init_from_from_any_folder(ci_runs, tmp_path, capsys, monkeypatch):
    import shutil
    from tcmlab.config import preset
    from tcmlab.train import train

    shutil.copytree(ci_runs / "s1", tmp_path / "s1")
    monkeypatch.chdir(tmp_path)
    train(preset("ci", 2, init_from="s1"), "s2", steps=1, progress=False)  # init_from relative to this folder
    monkeypatch.chdir(tmp_path / "s1")  # elsewhere, "s1/latest.safetensors" does not exist
    assert main(["info", str(tmp_path / "s2"), "--verify-init"]) == 0
    out = capsys.readouterr().out
    assert "started from s1/latest.safetensors at its step 20" in out and "now: same file)" in out
    (tmp_path / "moved").mkdir()  # the whole tree moved: the recorded path, looked up from here, finds it
    for name in ("s1", "s2"):
        (tmp_path / name).rename(tmp_path / "moved" / name)
    monkeypatch.chdir(tmp_path / "moved")
    assert main(["info", "s2", "--verify-init"]) == 0
    assert "now: same file (a relative path, looked up from the current folder))" in capsys.readouterr().out


def test_paths_must_not_be_empty_and_dfid_options_need_dfid_every(tmp_path, ci_runs, capsys):
    # "" would mean the current folder without saying so; --dfid-n without --dfid-every would be ignored
    for argv in (["train", "--preset", "ci", "--stage", "0", "--outdir", ""], ["sample", ""],
                 ["sample", str(ci_runs / "s1"), "--out", " "], ["demo", "--out", ""], ["sweep", "x.toml", "--out", ""]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "expected a path, got an empty one" in capsys.readouterr().err
    assert main(["train", "--preset", "ci", "--stage", "1", "--outdir", str(tmp_path / "r"), "--init-from",
                 str(ci_runs / "s0"), "--dfid-n", "5", "--dfid-t-prime", "1.0"]) == 2
    err = capsys.readouterr().err
    assert "--dfid-n, --dfid-t-prime set up the dFID_t evaluation" in err and "--dfid-every" in err
    assert not (tmp_path / "r").exists()


def test_demo_checks_t_mid_before_training(tmp_path, capsys):
    for bad in ("nan", "0.5", "80"):  # below the ci preset's t′ = 1, or not below T
        assert main(["demo", "--preset", "ci", "--out", str(tmp_path), "--t-mid", bad]) == 2
        assert "--t-mid" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing trained


def test_sample_says_how_many_samples_are_not_finite(tmp_path, ci_runs):
    with pytest.warns(UserWarning, match=r"samples_2step.png: \d+ of 4 samples hold non-finite values"):
        assert main(["sample", str(ci_runs / "s1"), "--out", str(tmp_path), "--n", "4", "--t-mid", "1e-300",
                     "--device", "cpu"]) == 0


def test_info_shows_the_scores_of_an_eval_jsonl_with_a_bad_line_and_says_so(tmp_path, ci_runs, capsys):
    import shutil
    run = tmp_path / "s1"
    shutil.copytree(ci_runs / "s1", run)
    (run / "eval.jsonl").write_text("x\n")  # a damaged first line; evaluate appends after it
    assert main(["evaluate", str(run), "--n", "40", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "eval.jsonl line 1 is not valid JSON" in out and "scores below are those of its readable lines" in out
    assert "eval.jsonl at step 20:" in out and "FID 1-step" in out


def test_a_metrics_row_with_a_bad_step_or_bytes_is_named(tmp_path, ci_runs, capsys):
    import shutil
    run = tmp_path / "s1"
    shutil.copytree(ci_runs / "s1", run)
    for bad, said in (('{"kind": "train", "step": "abc"}\n', "line 1: its step is 'abc', not an integer"),
                      (b"\xb8\xff\n", "is not UTF-8 text")):
        (run / "metrics.jsonl").write_bytes(bad if isinstance(bad, bytes) else bad.encode())
        assert main(["train", "--preset", "ci", "--stage", "1", "--outdir", str(run)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and str(run / "metrics.jsonl") in err and said in err, err


def test_outputs_of_one_checkpoint_are_never_filed_under_another_run(tmp_path, ci_runs, capsys):
    import shutil
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    shutil.copytree(ci_runs / "s1", s1)
    shutil.copytree(ci_runs / "s2", s2)
    before = sorted(p.name for p in s1.iterdir())
    assert main(["sample", str(s2), "--out", str(s1), "--n", "4", "--device", "cpu"]) == 2
    assert "is another run's directory" in capsys.readouterr().err
    shutil.copy(s2 / "latest.safetensors", s1 / "other.safetensors")
    for cmd in (["evaluate", str(s1 / "other.safetensors"), "--n", "20"], ["sample", str(s1 / "other.safetensors")]):
        assert main([*cmd, "--device", "cpu"]) == 2
        assert "holds another checkpoint" in capsys.readouterr().err
    assert main(["sample", str(s1 / "other.safetensors"), "--out", str(s1), "--device", "cpu"]) == 2
    assert "is another run's directory" in capsys.readouterr().err
    assert sorted(p.name for p in s1.iterdir()) == sorted(before + ["other.safetensors"])  # nothing written
    assert main(["sample", str(s1 / "latest.safetensors"), "--n", "4", "--device", "cpu"]) == 0  # its own: fine
