"""On a GPU: resume equality, live dFID, evaluate and sample, bf16/fp16 steps, DDP with nccl (2+ GPUs)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tcmlab import evalsets, metrics
from tcmlab.__main__ import main
from tcmlab.config import preset, with_overrides
from tcmlab.model import load_model, load_state
from tcmlab.train import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_runs")
    train(preset("ci", 0), root / "s0", device="cuda", progress=False)
    train(preset("ci", 1, init_from=str(root / "s0")), root / "s1", device="cuda", progress=False)
    return root


def test_resume_on_gpu_equals_uninterrupted(tmp_path, gpu_runs):
    cfg = preset("ci", 2, init_from=str(gpu_runs / "s1"))
    train(cfg, tmp_path / "full", device="cuda", progress=False)
    train(cfg, tmp_path / "split", steps=7, device="cuda", progress=False)
    train(cfg, tmp_path / "split", device="cuda", progress=False)  # RNG states restored from CPU tensors
    a, b = load_state(tmp_path / "full")[0], load_state(tmp_path / "split")[0]
    assert a["step"] == b["step"] == cfg.train.steps and len(a["rng"]["cuda"]) == 1
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k


def test_live_dfid_evaluate_and_sample_on_gpu(tmp_path, gpu_runs, capsys):
    es = evalsets.digits_eval_set()
    cfg = preset("ci", 1, init_from=str(gpu_runs / "s0"))
    train(cfg, tmp_path / "r", device="cuda", progress=False, eval_fn=metrics.dfid_callback(es, n=100), eval_every=10)
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [10, 20]
    weights = sum(p.numel() * 4 for p in load_model(tmp_path / "r").f.parameters()) / 2 ** 20
    assert all(r["peak_memory_mib"] > weights for r in rows if r["kind"] == "train")  # f, EMA, θ⁻ pass, RAdam
    assert main(["evaluate", str(tmp_path / "r"), "--n", "100", "--device", "cuda"]) == 0
    assert main(["sample", str(tmp_path / "r"), "--n", "16", "--device", "cuda"]) == 0
    assert (tmp_path / "r" / "samples_2step.png").exists()
    assert load_model(tmp_path / "r", device="cuda").f.net.parameters().__next__().is_cuda


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_on_gpu(tmp_path, gpu_runs, precision):
    cfg = preset("ci", 2, init_from=str(gpu_runs / "s1"))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision, steps=5))
    r = train(cfg, tmp_path / precision, device="cuda", progress=False)
    assert r.step == 5 and r.last["loss"] == r.last["loss"] and abs(r.last["loss"]) < float("inf")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP with nccl needs 2 or more GPUs")
def test_ddp_nccl_two_gpus_match_one(tmp_path, gpu_runs):
    overrides = ["train.steps=6", "net.dropout=0.0"]
    cfg = with_overrides(preset("ci", 1, init_from=str(gpu_runs / "s0")), overrides)
    train(cfg, tmp_path / "one", device="cuda", progress=False)
    sets = [a for o in overrides for a in ("--set", o)]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "tcmlab", "train", "--preset", "ci", "--stage", "1", "--outdir", str(tmp_path / "two"),
                        "--init-from", str(gpu_runs / "s0"), *sets], cwd=ROOT, env=dict(os.environ),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_state(tmp_path / "one")[0], load_state(tmp_path / "two")[0]
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-3, atol=1e-5), k


def test_channels_last_and_compile_train_the_plain_model_on_gpu(tmp_path):
    # inductor on the GPU (the CPU suite uses dynamo's eager backend): a small DDPM++ stage 2 with dropout, bf16,
    # channels_last and torch.compile ends where the same run without the two speed options ends, to bf16 rounding
    from tcmlab.config import NetConfig
    net = NetConfig(arch="ddpmpp", channels=16, channel_mult=(1, 2), depth=1, attn_resolutions=(4,), dropout=0.1)
    tiny = dict(steps=4, log_every=1, ckpt_every=10, batch=32, precision="bf16")
    s1 = preset("ci", 1)
    s1 = dataclasses.replace(s1, net=net, train=dataclasses.replace(s1.train, **tiny))
    train(s1, tmp_path / "s1", device="cuda", progress=False)
    s2 = preset("ci", 2, init_from=str(tmp_path / "s1"))
    s2 = dataclasses.replace(s2, net=net, train=dataclasses.replace(s2.train, **tiny))
    fast = dataclasses.replace(s2, train=dataclasses.replace(s2.train, channels_last=True, compile=True))
    plain, quick = train(s2, tmp_path / "plain", device="cuda", progress=False), train(fast, tmp_path / "fast",
                                                                                      device="cuda", progress=False)
    assert abs(plain.last["loss"] - quick.last["loss"]) <= 0.05 * abs(plain.last["loss"])
    a, b = load_state(tmp_path / "plain")[0], load_state(tmp_path / "fast")[0]
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-2, atol=1e-3), k
