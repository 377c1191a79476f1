import copy
import dataclasses
import json
import os
import stat
import warnings

import pytest
import torch

from tcmlab import checkpoint, rundir
from tcmlab.config import NetConfig, preset, with_overrides
from tcmlab.model import load_model, load_state
from tcmlab.train import NonFiniteError, train


def states_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_equals_uninterrupted(tmp_path, ci_runs, stage):
    init = {1: ci_runs / "s0", 2: ci_runs / "s1"}[stage]
    cfg = preset("ci", stage, init_from=str(init))
    train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "split", steps=7, progress=False)  # interrupted after 7 steps (checkpoint at the end)
    assert load_state(tmp_path / "split")[0]["step"] == 7
    train(cfg, tmp_path / "split", progress=False)  # resumed
    a, _ = load_state(tmp_path / "full")
    b, _ = load_state(tmp_path / "split")
    assert a["step"] == b["step"] == cfg.train.steps
    assert states_equal(a["model"], b["model"]) and states_equal(a["ema"], b["ema"])
    rows = [json.loads(l) for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == sorted({r["step"] for r in rows})


def test_evaluation_during_training_does_not_change_the_training(tmp_path, ci_runs):
    """An eval_fn that draws from the global RNG (torch-fidelity's DataLoader does) leaves the run as without it."""
    cfg = preset("ci", 2, init_from=str(ci_runs / "s1"))
    train(cfg, tmp_path / "plain", progress=False)
    draws = lambda step, ema: {"draw": float(torch.rand(()))}
    train(cfg, tmp_path / "evaluated", progress=False, eval_fn=draws, eval_every=3)
    a, b = load_state(tmp_path / "plain")[0], load_state(tmp_path / "evaluated")[0]
    assert states_equal(a["model"], b["model"]) and states_equal(a["ema"], b["ema"])
    rows = [json.loads(l) for l in (tmp_path / "evaluated" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [3, 6, 9, 12, 15, 18, 20]


def test_a_failed_evaluation_during_training_loses_no_training(tmp_path, ci_runs):
    """The state an evaluation looks at is checkpointed first: an evaluation that fails (or is killed) costs no step."""
    cfg = with_overrides(preset("ci", 1, init_from=str(ci_runs / "s0")), ["train.ckpt_every=100"])

    def fails_at_14(step, ema):
        if step == 14:
            raise RuntimeError("evaluation failed")
        return {}
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train(cfg, tmp_path / "run", progress=False, eval_fn=fails_at_14, eval_every=7)
    assert load_state(tmp_path / "run")[0]["step"] == 14
    # it resumes from there, and evaluates step 14 first (its checkpoint came before the evaluation that failed)
    assert train(cfg, tmp_path / "run", progress=False, eval_fn=lambda step, ema: {},
                 eval_every=7).step == cfg.train.steps
    rows = rundir.read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [7, 14, 20]


def test_an_old_stage2_checkpoint_without_theta0_asks_for_init_from(tmp_path, ci_runs):
    state = checkpoint.load(ci_runs / "s2" / "latest.safetensors")
    del state["teacher"]  # as written before θ0 was kept in the run
    checkpoint.save(tmp_path / "r" / "latest.safetensors", state)
    with pytest.raises(ValueError, match=r"holds no copy of θ0 \(written by an older tcmlab\): give the stage-1 run"):
        train(preset("ci", 2), tmp_path / "r", progress=False)


def test_sec_per_step_leaves_out_the_time_of_evaluations(tmp_path, ci_runs):
    """metrics.jsonl's sec_per_step times the training steps only: a slow evaluation (here 0.5 s, at a step that is
    not a logging step) does not land in the next row (the sweep's wall-clock comparison reads these rows)."""
    import time
    cfg = preset("ci", 1, init_from=str(ci_runs / "s0"))
    train(cfg, tmp_path / "run", progress=False, eval_fn=lambda step, ema: time.sleep(0.5) or {}, eval_every=7)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    secs = [r["sec_per_step"] * cfg.train.log_every for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [7, 14, 20]
    assert max(secs) < 0.4, secs  # five ci steps take milliseconds; with the evaluation a row would hold >= 0.5 s
    spent = load_state(tmp_path / "run")[0]["compute"]  # the compute record leaves the evaluations out as well
    assert 0 < spent["train_seconds"] < 0.5 * 3 and spent["since_step"] == 0, spent


def test_the_compute_a_run_spent_is_counted_across_resumes(tmp_path, ci_runs):
    """Each train row says how many images the run has seen and its wall-clock (device) seconds so far, summed over
    every call that trained it; the checkpoint carries the sums, so a resumed run goes on counting."""
    cfg = preset("ci", 1, init_from=str(ci_runs / "s0"))
    run = tmp_path / "run"
    train(cfg, run, steps=10, progress=False)
    first = load_state(run)[0]["compute"]
    train(cfg, run, progress=False)
    rows = [r for r in rundir.read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["images_seen"] for r in rows] == [r["step"] * cfg.train.batch for r in rows] == [320, 640, 960, 1280]
    seconds = [r["train_seconds"] for r in rows]
    assert seconds == sorted(seconds) and seconds[1] <= first["train_seconds"] < seconds[2], (seconds, first)
    assert all(r["device_seconds"] == r["train_seconds"] * r["world"] for r in rows)
    last = load_state(run)[0]["compute"]
    assert last["train_seconds"] >= seconds[-1] and last["since_step"] == 0
    # a checkpoint of an older tcmlab has no record: counting starts at its step, and the record says so
    state = checkpoint.load(run / "latest.safetensors")
    del state["compute"]
    checkpoint.save(run / "latest.safetensors", state)
    train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=25)), run, progress=False)
    again = load_state(run)[0]["compute"]
    assert again["since_step"] == 20 and again["train_seconds"] > 0


def test_stage2_theta0_is_stage1_ema_and_stays_frozen(tmp_path, ci_runs, monkeypatch):
    s1, _ = load_state(ci_runs / "s1")
    s2, cfg2 = load_state(ci_runs / "s2")
    assert cfg2.stage == 2 and s2["step"] == cfg2.train.steps
    assert not states_equal(s1["ema"], s2["model"])  # the student moved away from its stage-1 initialisation
    assert states_equal(s1["ema"], s2["teacher"])  # θ0 kept in the run = the stage-1 EMA, unchanged by training
    assert s2["init_source"]["step"] == s1["step"]
    rows = [json.loads(l) for l in (ci_runs / "s2" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["teacher_rows"] >= 16 for r in rows if r["kind"] == "train")  # ⌊64·0.25⌋ boundary rows at least
    # The θ0 the loss receives: stage-1 EMA weights (not raw), no gradients, dropout as `teacher_dropout` says.
    import tcmlab.stages as tr
    seen = []
    real = tr.tcm_loss

    def spy(f, f0, *a, **k):
        seen.append((f0.training, [p.requires_grad for p in f0.parameters()], copy.deepcopy(f0.state_dict())))
        return real(f, f0, *a, **k)

    monkeypatch.setattr(tr, "tcm_loss", spy)
    for dropout in (True, False):
        cfg = dataclasses.replace(cfg2, loss=dataclasses.replace(cfg2.loss, teacher_dropout=dropout))
        train(cfg, tmp_path / f"d{dropout}", steps=2, progress=False)
        training, grads, state = seen[-1]
        assert training is dropout and not any(grads)
        assert states_equal(state, s1["ema"]) and not states_equal(state, s1["model"])


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_every_stage_steps_with_the_foreach_optimiser(ci_runs, stage):
    """train() takes RAdam's multi-tensor update on the CPU too (torch's CPU default is the slower per-parameter
    loop; docs/performance.md), and the checkpoint's optimiser state says so for every stage."""
    state, _ = load_state(ci_runs / f"s{stage}")
    assert [g["foreach"] for g in state["optimizer"]["param_groups"]] == [True]


def test_initial_weights_depend_only_on_train_seed(tmp_path):
    cfg = preset("ci", 0)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=1))
    torch.manual_seed(123)  # earlier RNG use in the same process (a notebook, a sweep) must not matter
    train(cfg, tmp_path / "a", progress=False)
    torch.randn(1000)
    train(cfg, tmp_path / "b", progress=False)
    assert states_equal(load_state(tmp_path / "a")[0]["model"], load_state(tmp_path / "b")[0]["model"])
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=1))
    train(other, tmp_path / "c", progress=False)
    assert not states_equal(load_state(tmp_path / "a")[0]["model"], load_state(tmp_path / "c")[0]["model"])


def test_step_offset_continues_lr_and_power_ema_counters(tmp_path, ci_runs):
    # docs/decisions.md §11: the official stage 2 keeps counting stage-1 iterations (lr decay, power EMA).
    cfg = preset("ci", 2, init_from=str(ci_runs / "s1"))
    tc = dataclasses.replace(cfg.train, ema="power", lr_t_ref=4, steps=3, log_every=1)
    fresh = train(dataclasses.replace(cfg, train=tc), tmp_path / "fresh", progress=False)
    cont = train(dataclasses.replace(cfg, train=dataclasses.replace(tc, step_offset=20)), tmp_path / "cont",
                 progress=False)
    lr, gamma = cfg.train.lr, tc.ema_gamma
    assert fresh.last["lr"] == pytest.approx(lr)  # i = 2 < t_ref: the full rate
    assert fresh.last["ema_beta"] == pytest.approx((1 - 1 / 3) ** (gamma + 1))
    assert cont.last["lr"] == pytest.approx(lr / (22 / 4) ** 0.5)  # i = 2 + 20
    assert cont.last["ema_beta"] == pytest.approx((1 - 1 / 23) ** (gamma + 1))


def test_model_t_max_is_honoured_by_sampling_and_evaluation(tmp_path, ci_runs):
    from tcmlab import evalsets, metrics
    cfg = preset("ci", 1, init_from=str(ci_runs / "s0"))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=2),
                              loss=dataclasses.replace(cfg.loss, t_max=40.0))
    train(cfg, tmp_path / "t40", progress=False)
    m = load_model(tmp_path / "t40")
    assert m.t_max == 40.0
    rows = metrics.sample_quality(m, evalsets.digits_eval_set(), n=20)
    assert [r["card"]["steps"] for r in rows] == [(40.0,), (40.0, 1.0)]
    assert metrics.dfid_ts(40.0)[-1] == 40.0 and max(metrics.dfid_ts(40.0)) == 40.0


def test_no_second_definition_of_T():
    # T = 80 is defined once (tcmlab.precond.T_MAX); every other use refers to it or to a config's t_max.
    import ast
    import io
    import tokenize
    from pathlib import Path
    for path in Path("tcmlab").rglob("*.py"):
        toks = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
        lits = [t for t in toks if t.type == tokenize.NUMBER and ast.literal_eval(t.string) == 80]  # 0o22, 1_000, 2j
        if path.name == "precond.py":
            assert len(lits) == 1
        else:
            assert not lits, f"{path} line {lits[0].start[0]}: use precond.T_MAX or the config's t_max"


def test_stage2_refuses_incompatible_init(tmp_path, ci_runs):
    with pytest.raises(ValueError, match="stage-0 run"):
        train(preset("ci", 2, init_from=str(ci_runs / "s0")), tmp_path / "a", progress=False)
    other = dataclasses.replace(preset("ci", 2, init_from=str(ci_runs / "s1")), net=NetConfig(arch="mlp", channels=32,
                                depth=2, emb_channels=32, dropout=0.1))
    with pytest.raises(ValueError, match="incompatible network"):
        train(other, tmp_path / "b", progress=False)
    with pytest.raises(FileNotFoundError, match="train that stage first|no checkpoint"):
        train(preset("ci", 2, init_from=str(tmp_path / "missing")), tmp_path / "c", progress=False)


def test_run_dir_with_other_config_is_refused(tmp_path, ci_runs):
    cfg = preset("ci", 1, init_from=str(ci_runs / "s0"))
    train(cfg, tmp_path / "r", steps=2, progress=False)
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=5e-3))
    with pytest.raises(ValueError, match="train.lr"):
        train(other, tmp_path / "r", progress=False)
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=25))  # extending is allowed
    assert train(longer, tmp_path / "r", progress=False).step == 25
    # and so is changing how, not what, it computes (the speed options)
    faster = dataclasses.replace(longer, train=dataclasses.replace(longer.train, steps=26, cudnn_benchmark=False,
                                                                     channels_last=True))
    with pytest.warns(UserWarning, match="continuing with train.cudnn_benchmark True -> False"):
        assert train(faster, tmp_path / "r", progress=False).step == 26
    # and the bookkeeping options (metrics rows, checkpoint interval, rows per pass: the usual out-of-memory fix),
    # and a trailing slash in init_from
    kept = dataclasses.replace(faster, init_from=faster.init_from + "/", train=dataclasses.replace(
        faster.train, steps=28, log_every=1, ckpt_every=7, batch_gpu=faster.train.batch // 2))
    with pytest.warns(UserWarning, match="train.log_every .* -> 1, train.ckpt_every .* -> 7, train.batch_gpu 0 -> "):
        assert train(kept, tmp_path / "r", progress=False).step == 28
    with pytest.raises(ValueError, match=r"differs in: train.lr 0.001 -> 0.005"):  # the values, not just the name
        train(dataclasses.replace(kept, train=dataclasses.replace(kept.train, lr=5e-3)), tmp_path / "r",
              progress=False)
    shorter = dataclasses.replace(kept, train=dataclasses.replace(kept.train, steps=20))
    with pytest.raises(ValueError, match="is at step 28, past train.steps=20: a run cannot be shortened"):
        train(shorter, tmp_path / "r", progress=False)
    assert load_state(tmp_path / "r")[0]["step"] == 28


def test_nonfinite_loss_stops_and_keeps_checkpoint(tmp_path, ci_runs, nan_loss):
    cfg = preset("ci", 1, init_from=str(ci_runs / "s0"))
    train(cfg, tmp_path / "r", steps=5, progress=False)
    before = load_state(tmp_path / "r")[0]
    poison, heal = nan_loss
    poison("ect_loss")
    with pytest.raises(NonFiniteError, match="step 5"):
        train(cfg, tmp_path / "r", progress=False)
    after = load_state(tmp_path / "r")[0]
    assert after["step"] == 5 and states_equal(before["model"], after["model"])
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kind"] == "nonfinite" and rows[-1]["step"] == 5
    # what the error says to do: go on from the checkpoint with a lower lr, named; unnamed it is another run
    heal("ect_loss")
    lower = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=cfg.train.lr / 10))
    with pytest.raises(ValueError, match=r"train.lr .* --allow-change train.lr"):
        train(lower, tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="allow_change takes train.lr, train.precision"):
        train(lower, tmp_path / "r", progress=False, allow_change=("train.seed",))
    reseeded = dataclasses.replace(lower, train=dataclasses.replace(lower.train, seed=7))
    with pytest.raises(ValueError, match="differs in: .*train.seed") as refused:  # --allow-change would not do
        train(reseeded, tmp_path / "r", progress=False)
    assert "--allow-change" not in str(refused.value)
    from tcmlab.launch import run_stage
    with pytest.raises(ValueError, match="allow_change takes"):  # run_stage passes allow_change on (notebooks)
        run_stage(lower, tmp_path / "r", progress=False, allow_change=("train.seed",))
    with pytest.warns(UserWarning, match="continuing with train.lr"):
        assert train(lower, tmp_path / "r", steps=2, progress=False, allow_change=("train.lr",)).step == 7
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    change = next(r for r in rows if r["kind"] == "config_change")
    assert change["step"] == 5 and change["changes"] == [f"train.lr {cfg.train.lr!r} -> {lower.train.lr!r}"]
    assert max(r["lr"] for r in rows if r.get("kind") == "train" and r["step"] > 5) <= lower.train.lr
    assert "nonfinite" not in {r["kind"] for r in rows}  # the failed attempt's report went with the cut rows
    (discarded,) = [json.loads(l) for l in (tmp_path / "r" / "metrics.discarded.jsonl").read_text().splitlines()]
    assert discarded["kind"] == "nonfinite" and discarded["resumed_from"] == 5
    assert train(lower, tmp_path / "r", steps=1, progress=False).step == 8  # the run is now the lower-lr run


def test_a_stage2_run_resumes_without_init_from(tmp_path, ci_runs):
    # θ0 is kept in the run's checkpoint: the resume needs no teacher path (and a fresh stage 2 still does)
    cfg = preset("ci", 2, init_from=str(ci_runs / "s1"))
    train(cfg, tmp_path / "r", steps=2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: init_from was not given, not changed
        r = train(preset("ci", 2), tmp_path / "r", progress=False)
    assert r.step == cfg.train.steps and load_state(tmp_path / "r")[1].init_from == cfg.init_from
    with pytest.raises(ValueError, match="stage 2 needs init_from"):
        train(preset("ci", 2), tmp_path / "fresh", progress=False)


def test_stage1_without_init_from_says_it_starts_from_random_weights(tmp_path):
    cfg = dataclasses.replace(preset("ci", 1), train=dataclasses.replace(preset("ci", 1).train, steps=1))
    with pytest.warns(UserWarning, match="stage 1 starts from random weights: no init_from was given"):
        train(cfg, tmp_path / "a", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: no warning
        train(dataclasses.replace(cfg, from_scratch=True), tmp_path / "b", progress=False)


def test_a_run_that_fails_before_its_first_checkpoint_takes_the_fix(tmp_path, ci_runs, nan_loss):
    # nothing was trained under the config.json it left: the corrected command may start in the same folder
    poison, heal = nan_loss
    cfg = preset("ci", 1, init_from=str(ci_runs / "s0"))
    poison("ect_loss")
    with pytest.raises(NonFiniteError, match="at step 0, before any update, so the learning rate is not the cause"
                                             ".* No checkpoint was written, so the same --outdir"):
        train(cfg, tmp_path / "r", progress=False)
    assert (tmp_path / "r" / "config.json").exists() and not (tmp_path / "r" / "latest.safetensors").exists()
    heal("ect_loss")
    lower = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=cfg.train.lr / 10))
    with pytest.warns(UserWarning, match="no checkpoint was written under it"):
        assert train(lower, tmp_path / "r", steps=2, progress=False).step == 2
    assert load_state(tmp_path / "r")[1].train.lr == lower.train.lr


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "latest.safetensors"
    checkpoint.save(path, {"w": torch.ones(3), "step": 1})
    import tcmlab.checkpoint as ck

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"w": torch.zeros(3), "step": 2})
    state = checkpoint.load(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_checkpoints_get_plain_file_permissions(tmp_path):
    # mkstemp makes 0600 files and os.replace keeps the mode: a shared run folder's checkpoint must be group-readable
    old = os.umask(0o022)
    try:
        checkpoint.save(tmp_path / "latest.safetensors", {"w": torch.ones(1)})
        checkpoint.atomic_write_text(tmp_path / "config.json", "{}")
    finally:
        os.umask(old)
    assert {stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("latest.safetensors", "config.json")} == {0o644}


def test_a_killed_saves_temporary_file_is_removed_at_the_next_start(tmp_path, ci_runs):
    cfg = preset("ci", 1, init_from=str(ci_runs / "s0"))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=4))
    train(cfg, tmp_path / "r", steps=2, progress=False)
    left = tmp_path / "r" / ".latest.safetensors.k1ll3d.tmp"  # what SIGKILL during checkpoint.save leaves
    left.write_bytes(b"\0" * 1000)
    keep = tmp_path / "r" / "notes.tmp"  # not an atomic write's temporary: the user's
    keep.write_text("mine")
    other = tmp_path / "r" / ".eval.jsonl.x7.tmp"  # an evaluation's, which may be writing right now: not train's
    other.write_text("theirs")
    with pytest.warns(UserWarning, match="left by a save that was killed mid-write"):
        train(cfg, tmp_path / "r", progress=False)
    assert not left.exists() and keep.read_text() == "mine" and other.read_text() == "theirs"
    assert load_state(tmp_path / "r")[0]["step"] == 4


def test_damaged_checkpoint_gives_clear_error(tmp_path):
    path = tmp_path / "latest.safetensors"
    path.write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="damaged"):
        checkpoint.load(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load(tmp_path / "nope.safetensors")


def test_checkpoint_roundtrip_nested_state():
    state = {"a": [torch.arange(3), {"b": 1.5, "c": None}], "s": "x", 3: torch.zeros(2, dtype=torch.uint8)}
    tensors = {}
    skel = checkpoint.flatten(state, "s", tensors)
    back = checkpoint.unflatten(json.loads(json.dumps(skel)), tensors)
    assert torch.equal(back["a"][0], torch.arange(3)) and back["a"][1] == {"b": 1.5, "c": None}


def test_power_ema_and_adam_with_lr_decay(tmp_path, ci_runs):
    cfg = preset("ci", 1, init_from=str(ci_runs / "s0"))
    tc = dataclasses.replace(cfg.train, optimizer="adam", ema="power", ema_gamma=6.94, lr_t_ref=4, steps=10,
                             betas=(0.9, 0.99))
    r = train(dataclasses.replace(cfg, train=tc), tmp_path / "p", progress=False)
    assert r.last["lr"] == pytest.approx(1e-3 / (9 / 4) ** 0.5)
    assert r.last["ema_beta"] == pytest.approx((1 - 1 / 10) ** 7.94)


def test_channels_last_and_compile_change_how_not_what(tmp_path, monkeypatch):
    # train.channels_last and train.compile on a small DDPM++ U-Net, stage 2 (student, θ⁻ and θ0, routed rows):
    # the same weights as the plain run up to float rounding, channels_last weights inside, contiguous checkpoints
    # that resume. torch.compile runs with dynamo's eager backend here (inductor's code generation takes minutes on
    # a CPU; the graphs, guards and recompiles are dynamo's either way).
    nets, calls, settings = [], [], []
    real_compile = torch.compile

    def spy_compile(m):
        nets.append(m)
        settings.append(inductor_config.fallback_random)
        c = real_compile(m, backend="eager")
        c.register_forward_pre_hook(lambda mod, args, k=len(nets) - 1: calls.append(k))
        return c

    monkeypatch.setattr(torch, "compile", spy_compile)
    from torch._inductor import config as inductor_config
    net = NetConfig(arch="ddpmpp", channels=8, channel_mult=(1, 2), depth=1, attn_resolutions=(4,), dropout=0.1)
    tiny = dict(steps=3, log_every=1, ckpt_every=10, batch=16)
    s1 = preset("ci", 1)
    s1 = dataclasses.replace(s1, net=net, train=dataclasses.replace(s1.train, **tiny), from_scratch=True)
    train(s1, tmp_path / "s1", progress=False)
    s2 = preset("ci", 2, init_from=str(tmp_path / "s1"))
    s2 = dataclasses.replace(s2, net=net, train=dataclasses.replace(s2.train, **tiny))
    fast = dataclasses.replace(s2, train=dataclasses.replace(s2.train, channels_last=True, compile=True))
    train(s2, tmp_path / "plain", progress=False)
    assert nets == []
    before = inductor_config.fallback_random
    train(fast, tmp_path / "fast", progress=False)
    assert settings == [True] * 3 and inductor_config.fallback_random == before  # replayable masks; restored after
    assert len(nets) == 3  # the student, θ⁻ (the same module) and θ0
    assert nets[0] is nets[1] and nets[2] is not nets[0] and set(calls) == {0, 1, 2}  # and the loss calls all three
    convs = [p for m in nets for p in m.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    a, b = load_state(tmp_path / "plain")[0], load_state(tmp_path / "fast")[0]
    for which in ("model", "ema", "teacher"):
        for k in a[which]:
            assert b[which][k].is_contiguous() and torch.allclose(a[which][k], b[which][k], atol=1e-6), (which, k)
    train(fast, tmp_path / "split", steps=2, progress=False)
    import tcmlab.train as train_module
    layouts = []

    def spy_formats(opt):
        real_formats(opt)
        layouts.extend(v.stride() == p.stride() for p, st in opt.state.items() for v in st.values() if v.dim() == 4)

    real_formats = train_module.match_optimizer_formats
    monkeypatch.setattr(train_module, "match_optimizer_formats", spy_formats)
    train(fast, tmp_path / "split", progress=False)  # resumed from a contiguous checkpoint into channels_last weights
    assert layouts and all(layouts)  # the optimiser's state took the weights' channels_last layout again
    c = load_state(tmp_path / "split")[0]
    assert c["step"] == 3 and all(torch.allclose(b["model"][k], c["model"][k], atol=1e-6) for k in b["model"])


def test_stage2_names_what_does_not_continue_stage1(tmp_path, ci_runs):
    # TCM App. E: stage 2 keeps stage 1's T and final r; an override in one stage only must not pass unseen
    cfg = preset("ci", 2, init_from=str(ci_runs / "s1"))
    cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, t_max=10.0, ratio=0.999),
                              train=dataclasses.replace(cfg.train, steps=1))
    with pytest.warns(UserWarning, match=r"loss.t_max 80.0 in stage 1, 10.0 here; loss.ratio .* 0.99 in stage 1, "
                                         r"0.999 here"):
        train(cfg, tmp_path / "odd", progress=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # the preset's own pair continues stage 1
        train(dataclasses.replace(cfg, loss=preset("ci", 2).loss), tmp_path / "paired", progress=False)
    assert not [w for w in seen if "does not continue" in str(w.message)]


def test_grad_spike_is_judged_against_the_median_of_the_recent_steps():
    from tcmlab.health import grad_spike
    recent = [1.0] * 19
    assert grad_spike(recent, 1e6) is None  # fewer than 20 recent steps: no verdict yet
    recent.append(3.0)
    assert grad_spike(recent, 10.0) is None and grad_spike(recent, 10.01) == 1.0  # 10 × the median, not the mean
    assert grad_spike(recent, float("inf")) is None and grad_spike(recent, float("nan")) is None
    assert grad_spike([0.0] * 20, 1e-9) is None  # no gradient so far: nothing to compare with


def test_a_gradient_spike_between_metrics_rows_is_logged_and_training_goes_on(tmp_path, monkeypatch):
    """A step whose gradient norm is 10× the recent median gets a grad_spike row even when it is not a logging step,
    and the next train row's grad_norm_max shows it; the run trains on (a spike is reported, not acted on). The
    window travels in the checkpoint: a run resumed 8 steps before the spike (fewer than the 20 a window needs)
    reports what the uninterrupted run reports."""
    import tcmlab.stages as stages
    from tcmlab import plots
    real, calls = stages.edm_loss, []

    def spiky(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        if len(calls) == 33:  # step 33 (of 40), between the rows at 30 and 35
            out.loss = out.loss * 1000
        return out

    monkeypatch.setattr(stages, "edm_loss", spiky)
    cfg = preset("ci", 0)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=40, log_every=5, ckpt_every=100))
    runs = {}
    for name, slices in (("full", (None,)), ("split", (25, None))):
        calls.clear()
        for k in slices:
            r = train(cfg, tmp_path / name, steps=k, progress=False)
        assert r.step == 40
        runs[name] = rundir.read_metrics(tmp_path / name / "metrics.jsonl")
    rows = runs["full"]
    spikes = [x for x in rows if x["kind"] == "grad_spike"]
    assert [x["step"] for x in spikes] == [33], spikes
    assert spikes[0]["grad_norm"] > 10 * spikes[0]["median_grad_norm"] and spikes[0]["window"] == 32
    by_step = {x["step"]: x for x in rows if x["kind"] == "train"}
    assert by_step[35]["grad_norm_max"] == spikes[0]["grad_norm"]  # the largest since the row at step 30
    assert by_step[35]["grad_norm"] < spikes[0]["grad_norm"] / 10
    assert by_step[40]["grad_norm_max"] < by_step[35]["grad_norm_max"]
    watched = lambda rows: [(x["kind"], x["step"], x.get("grad_norm_max"), x.get("median_grad_norm"), x["grad_norm"])
                            for x in rows if x["kind"] in ("train", "grad_spike")]
    assert watched(runs["split"]) == watched(rows)
    fig = plots.training_curves(tmp_path / "full")  # the spike is marked where notebooks 01/02 show the curves
    marked = [tr for tr in fig.data if tr.name.startswith("spike")]
    assert len(marked) == 1 and list(marked[0].x) == [33]


def test_a_call_that_trains_nothing_leaves_the_checkpoint_as_it_was(tmp_path):
    """Running a finished stage again (`make demo` twice, the same train command) must not rewrite its checkpoint: a
    stage 2 records the sha256 of the stage-1 file it started from, and a new file would read as another teacher.
    The same holds for a checkpoint of an older tcmlab (no compute record, no checksums)."""
    from safetensors.torch import save_file
    cfg = preset("ci", 0)
    run = tmp_path / "s0"
    train(cfg, run, progress=False)
    ckpt = run / "latest.safetensors"
    before = ckpt.read_bytes()
    assert train(cfg, run, progress=False).step == cfg.train.steps
    assert ckpt.read_bytes() == before
    state = checkpoint.load(ckpt)  # as an older tcmlab wrote it
    del state["compute"], state["health"]
    tensors = {}
    skeleton = checkpoint.flatten(state, "s", tensors)
    save_file(tensors, str(ckpt), metadata={"tcmlab": json.dumps(skeleton)})
    old = ckpt.read_bytes()
    train(cfg, run, progress=False)
    assert ckpt.read_bytes() == old
