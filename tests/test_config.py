import dataclasses
import json
import re
from pathlib import Path

import pytest

from tcmlab.config import (DataConfig, ECTConfig, EDMConfig, NetConfig, RunConfig, TCMConfig, TrainConfig, from_dict,
                           preset, to_dict, to_json, PRESETS)


def test_cifar10_preset_matches_paper_row_by_row():
    s1, s2 = preset("cifar10", 1), preset("cifar10", 2)
    # TCM App. E / official README (docs/decisions.md §15)
    assert (s1.net.arch, s1.net.channels, s1.net.channel_mult, s1.net.depth, s1.net.attn_resolutions) == \
        ("ddpmpp", 128, (2, 2, 2), 4, (16,))
    assert (s1.train.batch, s1.train.steps, s2.train.batch, s2.train.steps) == (512, 250_000, 1024, 200_000)
    assert (s1.train.optimizer, s1.train.lr, s2.train.optimizer, s2.train.lr) == ("radam", 1e-4, "radam", 5e-5)
    assert s1.train.ema == s2.train.ema == "const" and s1.train.ema_beta == s2.train.ema_beta == 0.9999
    assert s1.net.dropout == s2.net.dropout == 0.2
    assert (s1.loss.P_mean, s1.loss.P_std, s1.loss.t_min, s1.loss.t_max) == (-1.1, 2.0, 0.002, 80.0)
    assert (s2.loss.t_prime, s2.loss.psi_scale, s2.loss.psi_nu, s2.loss.t_max) == (1.0, 0.2, 0.01, 80.0)
    assert (s1.loss.c, s1.loss.weighting, s2.loss.c, s2.loss.weighting) == (1e-8, "inv_dt", 1e-8, "inv_dt")
    assert (s1.loss.q, s1.loss.d, s1.loss.ratio_max, s2.loss.ratio) == (2.0, 25_000, 0.999, 0.999)
    assert (s2.loss.w_b, s2.loss.rho) == (0.1, 0.25)
    assert s1.train.precision == "fp32"
    with pytest.raises(ValueError, match="EDM checkpoint"):
        preset("cifar10", 0)


def test_digits_preset_is_the_measured_recipe_and_the_sweeps_pin_the_earlier_one():
    """The digits preset is sweeps/digits_fast.toml's recipe (docs/results/digits_recipe.md): stage 0 alone at lr
    5e-3, T = 10 in stages 1 and 2 (docs/decisions.md §18); digits_fast_T80 is that recipe at T = 80 with the longer
    stages 1 and 2 it was measured with, and the sweeps run before it pin the earlier lr 1e-3, d = 500 and T = 80, so
    their committed tables stay theirs."""
    from tcmlab.sweep import expand, load_spec

    s0, s1, s2 = (preset("digits", k, init_from="x" if k == 2 else None) for k in range(3))
    assert (s0.train.lr, s1.train.lr, s2.train.lr) == (5e-3, 1e-3, 5e-4)
    assert (s0.train.steps, s1.train.steps, s2.train.steps, s1.loss.d) == (3000, 2500, 500, 250)
    assert (s1.t_max, s2.t_max) == (10.0, 10.0)
    root = Path(__file__).resolve().parents[1] / "sweeps"
    for name in ("digits_claims", "digits_long", "digits_teacher"):
        points = expand(load_spec(root / f"{name}.toml"))
        assert {p.cfg.train.lr for p in points if p.kind == "stage0"} == {1e-3}, name
        if name != "digits_teacher":  # digits_teacher grids d over {250, 500}
            assert {p.cfg.loss.d for p in points if p.kind == "stage1"} == {500}, name
        assert {p.cfg.t_max for p in points} == {80.0}, name
    fast, t80 = ({p.kind: p.cfg for p in expand(load_spec(root / f"{name}.toml")) if p.seed == 0}
                 for name in ("digits_fast", "digits_fast_T80"))
    assert [fast[f"stage{k}"] for k in range(3)] == [
        dataclasses.replace(c, init_from=fast[f"stage{k}"].init_from) for k, c in enumerate((s0, s1, s2))]
    assert t80["stage0"] == dataclasses.replace(fast["stage0"], init_from=t80["stage0"].init_from)
    for kind in ("stage1", "stage2", "control"):
        assert t80[kind].loss == dataclasses.replace(fast[kind].loss, t_max=80.0), kind
        assert t80[kind].net == fast[kind].net, kind
        assert dataclasses.replace(t80[kind].train, steps=fast[kind].train.steps) == fast[kind].train, kind
    assert (t80["stage1"].train.steps, t80["stage2"].train.steps) == (3000, 1000)  # the recipe's steps then


@pytest.mark.parametrize("cls, kw, name", [
    (TCMConfig, dict(t_prime=0.0), "tprime"), (TCMConfig, dict(t_prime=80.0), "tprime"),
    (TCMConfig, dict(rho=1.0), "rho"), (TCMConfig, dict(rho=0.0), "rho"), (TCMConfig, dict(w_b=-0.1), "w_b"),
    (TCMConfig, dict(psi_nu=0.0), "psi_nu"), (TCMConfig, dict(psi_scale=-1.0), "psi_scale"),
    (TCMConfig, dict(teacher_passes="half"), "teacher_passes"), (TrainConfig, dict(batch=1), "train.batch"),
    (TrainConfig, dict(lr=0.0), "train.lr"), (TrainConfig, dict(precision="fp8"), "train.precision"),
    (TrainConfig, dict(cudnn_benchmark="false"), "train.cudnn_benchmark"),
    (ECTConfig, dict(ratio_max=1.0), "ratio_max"), (ECTConfig, dict(q=1.0), "loss.q"),
    (NetConfig, dict(dropout=1.0), "net.dropout"), (DataConfig, dict(name="mnist"), "data.name"),
    (EDMConfig, dict(P_std=0.0), "P_std"),
])
def test_validation_names_the_field(cls, kw, name):
    with pytest.raises(ValueError, match=re.escape(name)):
        cls(**kw)


def test_stage2_needs_init_from(tmp_path):
    from tcmlab.train import train
    with pytest.raises(ValueError, match="stage 2 needs init_from"):
        train(preset("ci", 2), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()  # refused before anything was written


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_roundtrip(name):
    for c in PRESETS[name]:
        if c is not None:
            assert from_dict(to_dict(c)) == c == from_dict(json.loads(to_json(c)), strict=True)


@pytest.mark.parametrize("key, value, message", [
    ("net.channels", 8.5, "net.channels must be an integer, got 8.5"),
    ("init_from", 5, "init_from must be a string or null, got 5"),
    ("train.steps", 3.5, "train.steps must be an integer, got 3.5"),
    ("train.steps", True, "train.steps must be an integer, got True"),
    ("train.log_every", 2.5, "train.log_every must be an integer"), ("name", 5, "name must be a string, got 5"),
    ("from_scratch", "false", "from_scratch must be true or false, got 'false'"),
    ("train.batch", 16.5, "train.batch must be an integer"), ("train.seed", 0.5, "train.seed must be an integer"),
    ("stage", 9, "stage must be 0, 1 or 2, got 9"), ("stage", True, "stage must be 0, 1 or 2"),
    ("train.lr", True, "train.lr must be a finite number, got True"), ("loss.t_prime", "1", "loss.t_prime must be a"),
    ("train.betas", [0.9], "train.betas must be a list of two finite numbers"),
    ("net.channel_mult", [1, 2.0], "net.channel_mult must be a list of integers"),
    ("train.cudnn_benchmark", 1, "train.cudnn_benchmark must be true or false, got 1"), ("data", [], "data must be"),
])
def test_a_config_file_value_of_the_wrong_type_is_refused_naming_the_field(key, value, message):
    d = json.loads(to_json(preset("ci", 2, init_from="runs/s1")))
    section, _, name = key.rpartition(".")
    (d[section] if section else d)[name] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        from_dict(d, strict=True)


def test_a_config_file_may_write_a_whole_float_as_an_integer():
    d = to_dict(preset("ci", 1))
    d["train"]["lr"], d["loss"]["t_max"] = 1, 80
    cfg = from_dict(d)
    assert (cfg.train.lr, cfg.loss.t_max) == (1.0, 80.0) and type(cfg.train.lr) is type(cfg.loss.t_max) is float


def test_train_seed_keeps_the_dropout_seeds_of_train_py_in_range():
    from tcmlab.config import with_overrides
    for seed in ("9223372036854775806", "4294967296", "-1"):
        with pytest.raises(ValueError, match=re.escape(f"train.seed must be an integer in [0, 2**32), got {seed}")):
            with_overrides(preset("ci", 1), [f"train.seed={seed}"])
    assert with_overrides(preset("ci", 1), ["train.seed=4294967295"]).train.seed == 2**32 - 1
    import torch
    torch.manual_seed(((2**32 - 1) * 1000 + 999) * 1_000_003 + 10**15)  # train.py's largest dropout seed: accepted


def test_a_config_built_in_python_is_checked_like_one_read_from_a_file():
    # else it would train, checkpoint, and then fail to load: from_dict checks the types
    import dataclasses
    with pytest.raises(ValueError, match=re.escape("train.steps must be an integer, got 2.0")):
        dataclasses.replace(preset("ci", 1).train, steps=2.0)
    with pytest.raises(ValueError, match=re.escape("from_scratch must be true or false, got 1")):
        dataclasses.replace(preset("ci", 1), from_scratch=1)


def test_name_is_a_non_empty_string():
    from tcmlab.config import with_overrides
    for item in ("name=", "name=none"):
        with pytest.raises(ValueError, match="name must be a non-empty string"):
            with_overrides(preset("ci", 1), [item])
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        from_dict({**to_dict(preset("ci", 1)), "name": ""})


def test_t_prime_and_t_min_lie_above_the_clamp_of_r():
    """r = t − Δt is clamped at schedules.R_MIN (official code): at t below it Δt < 0, the 1/Δt weight turns negative
    and training ascends the loss."""
    from tcmlab.config import with_overrides
    from tcmlab.schedules import R_MIN, delta_t
    assert delta_t(R_MIN / 2, 0.999) < 0 < delta_t(2 * R_MIN, 0.999)
    because = "must be > 1e-06 (r = t − Δt is clamped at 1e-06, so below it the weight 1/Δt is negative)"
    with pytest.raises(ValueError, match=re.escape(f"tprime (loss.t_prime) {because}, got 1e-08")):
        with_overrides(preset("ci", 2, init_from="runs/s1"), ["loss.t_prime=1e-8"])
    with pytest.raises(ValueError, match=re.escape(f"loss.t_min {because}, got 1e-12")):
        with_overrides(preset("ci", 1), ["loss.t_min=1e-12"])
    with pytest.raises(ValueError, match=re.escape(f"loss.t_min {because}, got 1e-06")):
        ECTConfig(t_min=R_MIN)
    assert ECTConfig(t_min=2 * R_MIN).t_min == TCMConfig(t_prime=2 * R_MIN).t_prime == 2 * R_MIN


def test_every_config_field_is_read_somewhere(tmp_path, monkeypatch):
    """Every field of every config class is read, through an instance of that class, by library code outside
    config.py while a tiny run of each stage trains, is sampled and evaluated, and each data set loads."""
    import sys
    from tcmlab import evalsets, metrics
    from tcmlab.data import load_data
    from tcmlab.model import load_model
    from tcmlab.nets import build_net
    from tcmlab.train import train

    classes = (DataConfig, NetConfig, TrainConfig, EDMConfig, ECTConfig, TCMConfig, RunConfig)
    read = set()
    lib = str(Path("tcmlab").resolve())

    def spy(cls):
        names = {f.name for f in dataclasses.fields(cls)}

        def getattribute(self, name):
            if name in names:
                caller = sys._getframe(1).f_code.co_filename
                if caller.startswith(lib) and not caller.endswith("config.py"):
                    read.add((type(self).__name__, name))
            return object.__getattribute__(self, name)
        return getattribute

    for cls in classes:
        monkeypatch.setattr(cls, "__getattribute__", spy(cls))
    tiny = dict(steps=2, log_every=1, ckpt_every=1)
    runs = []
    for stage in (0, 1, 2):
        cfg = preset("ci", stage, init_from=str(runs[-1]) if runs else None)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **tiny))
        runs.append(tmp_path / f"s{stage}")
        train(cfg, runs[-1], progress=False)
    es = evalsets.digits_eval_set()
    metrics.sample_quality(load_model(runs[-1]), es, n=20)
    build_net(NetConfig(arch="ddpmpp", channels=8, channel_mult=(1,), depth=1, attn_resolutions=(4,)), (1, 4, 4))
    load_data(DataConfig("toy2d", toy="gaussians8"))
    load_data(DataConfig("synthetic", synthetic_n=4))
    with pytest.raises(FileNotFoundError):
        load_data(DataConfig("cifar10", root=str(tmp_path / "no-cifar")))
    with pytest.raises(ValueError, match="from_scratch"):
        train(preset("cifar10", 1), tmp_path / "c10", progress=False)
    unread = [f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
              if (cls.__name__, f.name) not in read]
    assert not unread, f"config fields never read by the library: {unread}"


def test_stage2_needs_a_boundary_row_unless_w_b_is_zero():
    # TCM §3 / Eq. (7): N_B = int(B·ρ) = 0 would drop L_B silently and let the objective collapse at t′.
    s2 = preset("ci", 2, init_from="runs/s1")
    with pytest.raises(ValueError, match=r"N_B = int\(batch·rho\) >= 1 boundary row at batch 3"):
        dataclasses.replace(s2, train=dataclasses.replace(s2.train, batch=3))
    no_lb = dataclasses.replace(s2, loss=dataclasses.replace(s2.loss, w_b=0.0))
    assert dataclasses.replace(no_lb, train=dataclasses.replace(s2.train, batch=3)).train.batch == 3
    assert dataclasses.replace(s2, train=dataclasses.replace(s2.train, batch=4)).train.batch == 4  # N_B = 1


def test_a_mistyped_or_misplaced_override_says_what_was_meant():
    from tcmlab.config import with_overrides
    with pytest.raises(ValueError, match=r"Did you mean train.steps"):
        with_overrides(preset("ci", 1), ["train.step=20"])
    with pytest.raises(ValueError, match=r"loss.t_prime is a field of stage 2, not of stage 1"):
        with_overrides(preset("ci", 1), ["loss.t_prime=0.5"])
    with pytest.raises(ValueError, match=r"net.channel_mult must be one or more integers"):
        with_overrides(preset("ci", 0), ["net.channel_mult="])
    with pytest.raises(ValueError, match=r"unknown config field\(s\) loss.tprime"):
        d = to_dict(preset("ci", 2))
        d["loss"]["tprime"] = 0.5
        from_dict(d, strict=True)
    assert from_dict(d) == preset("ci", 2)  # a checkpoint of a newer tcmlab (an extra field) still loads


def test_an_override_of_a_field_the_run_never_reads_is_warned_about():
    import warnings
    from tcmlab.config import with_overrides

    with pytest.warns(UserWarning, match=r"--set data.root: only a run with data.name='cifar10' reads it, and this one "
                                         r"has data.name='digits'; the value has no effect"):
        cfg = with_overrides(preset("digits", 1), ["data.root=/mnt/cifar"])
    assert cfg.data.root == "/mnt/cifar"  # still set: the run is what was asked for
    with pytest.warns(UserWarning, match=r"--set net.channel_mult: only a run with net.arch='ddpmpp'"):
        with_overrides(preset("ci", 0), ["net.channel_mult=1,2"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with_overrides(preset("cifar10", 1), ["data.root=/mnt/cifar", "from_scratch=true"])
        with_overrides(preset("ci", 0), ["data.toy=gaussians8", "data.name=toy2d"])  # read once the name is set
        with_overrides(preset("digits", 1), ["net.arch=ddpmpp", "net.channel_mult=1,2", "train.steps=5"])
        # notebook 02 names its stage-2 folder by trying each override alone: no warning for a pair that reads both
        from tcmlab.nbparams import stage2_dir
        cfg2 = with_overrides(preset("digits", 2, init_from="runs/s1"), ["data.name=toy2d", "data.toy=gaussians8"])
        assert stage2_dir("runs", cfg2, "data.name=toy2d data.toy=gaussians8").name.endswith("data.toy=gaussians8")
