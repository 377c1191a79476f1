"""Mixed precision: only the network F runs under autocast; preconditioning, losses and EMA stay fp32 (EDM2/TCM)."""

import dataclasses
import math

import pytest
import torch

from tcmlab.config import preset
from tcmlab.model import build_model, load_model
from tcmlab.stages import make_stage
from tcmlab.train import train

BF16_REL_TOL = 0.05  # stated tolerance: a bf16 loss within 5% of the fp32 loss on the same batch and weights


def loss_at(stage, precision, i):
    cfg = preset("ci", stage, init_from="x" if stage else None)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    torch.manual_seed(0)
    f = build_model(cfg, (1, 8, 8)).eval()
    g = torch.Generator().manual_seed(1)
    x, eps = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1, torch.randn(64, 1, 8, 8, generator=g)
    st = make_stage(cfg)
    t, is_b = st.sample_times(64, g)
    out = f(x, t)
    assert out.dtype == torch.float32  # c_skip·x + c_out·F in fp32 whatever F ran in
    return st.loss(f, x, eps, t, is_b, i, 64, f0=f).loss.item()


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("i", [0, 10**9])  # start and end of the curriculum (ratio 0.5 and ratio_max)
def test_bf16_loss_is_within_tolerance_of_fp32(stage, i):
    a, b = loss_at(stage, "fp32", i), loss_at(stage, "bf16", i)
    assert a != b  # autocast really changed the arithmetic
    assert abs(b / a - 1) < BF16_REL_TOL


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_keep_fp32_weights(tmp_path, ci_runs, precision):
    cfg = preset("ci", 2, init_from=str(ci_runs / "s1"))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision, steps=3, log_every=1))
    r = train(cfg, tmp_path / precision, progress=False)
    assert r.step == 3 and math.isfinite(r.last["loss"])
    m = load_model(tmp_path / precision)
    assert all(p.dtype == torch.float32 for p in m.f.parameters())  # weights and EMA stay fp32


def test_float32_math_turns_tf32_off_for_fp32_and_restores_torch_s_flags():
    from tcmlab.precision import float32_math, math_flags
    before = math_flags()
    for precision, tf32 in (("fp32", False), ("bf16", False), ("fp16", False), ("tf32", True)):
        with float32_math(precision, cudnn_benchmark=True):
            assert math_flags() == {"matmul_tf32": tf32, "cudnn_tf32": tf32, "fp16_reduced_reduction": tf32,
                                    "cudnn_benchmark": True}, precision
        assert math_flags() == before
    with pytest.raises(ValueError, match="precision"):
        with float32_math("fp8", cudnn_benchmark=False):
            pass
    assert math_flags() == before
    with pytest.raises(RuntimeError, match="inside"):  # restored when the body raises, too
        with float32_math("tf32", cudnn_benchmark=not before["cudnn_benchmark"]):
            raise RuntimeError("inside")
    assert math_flags() == before


@pytest.mark.parametrize("precision, benchmark", [("fp32", True), ("tf32", False)])
def test_train_runs_under_its_precision_s_float32_flags(tmp_path, monkeypatch, precision, benchmark):
    # torch's defaults (cuDNN convolutions in TF32) must not leak into an 'fp32' run: the official recipe has TF32 off
    from tcmlab import precision as prec
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    before = prec.math_flags()
    seen = []
    cfg = preset("ci", 0)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision, steps=2, log_every=1,
                                                             cudnn_benchmark=benchmark))
    train(cfg, tmp_path / "r", progress=False, on_log=lambda row: seen.append(prec.math_flags()))
    tf32 = precision == "tf32"
    want = {"matmul_tf32": tf32, "cudnn_tf32": tf32, "fp16_reduced_reduction": tf32, "cudnn_benchmark": benchmark}
    assert seen and all(s == want for s in seen)
    assert prec.math_flags() == before


def test_fp16_steps_the_scaler_skips_are_logged(tmp_path, ci_runs, monkeypatch):
    # a scale of 2^100 overflows the fp16 gradients: the scaler skips every step; each skip must be reported
    import functools

    from tcmlab import rundir
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**100))
    cfg = preset("ci", 2, init_from=str(ci_runs / "s1"))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="fp16", steps=3, log_every=1))
    r = train(cfg, tmp_path / "fp16", progress=False)
    skips = [row for row in rundir.read_metrics(tmp_path / "fp16" / "metrics.jsonl") if row["kind"] == "fp16_skip"]
    assert [row["step"] for row in skips] == [0, 1, 2] and r.step == 3
    assert [row["scale"] for row in skips] == [2.0**100, 2.0**99, 2.0**98]
    assert all(row["next_scale"] == row["scale"] / 2 and row["nonfinite_grads"] > 0 for row in skips)


def test_float32_math_works_after_the_new_tf32_api_was_used():
    # torch >= 2.9: after `fp32_precision` or `set_float32_matmul_precision`, reading the legacy allow_tf32 flags
    # raises and setting them breaks get_float32_matmul_precision; a fresh process, as the flags are process-wide
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from tcmlab.precision import float32_math, math_flags\n"
        "torch.set_float32_matmul_precision('high')\n"
        "torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
        "with float32_math('fp32', True):\n"
        "    assert not math_flags()['matmul_tf32'] and not math_flags()['cudnn_tf32']\n"
        "    torch.get_float32_matmul_precision()\n"
        "assert torch.backends.cuda.matmul.fp32_precision == 'tf32' and math_flags()['matmul_tf32']\n"
        "torch.backends.cuda.matmul.fp32_precision = 'none'\n"  # inherits the global setting
        "torch.backends.fp32_precision = 'tf32'\n"
        "with float32_math('fp32', True):\n"
        "    assert not math_flags()['matmul_tf32']\n"
        "torch.backends.fp32_precision = 'ieee'\n"
        "assert torch.backends.cuda.matmul.fp32_precision == 'ieee'\n"  # it follows the global setting again
        "print('ok')\n")
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this torch has only the legacy allow_tf32 flags")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert r.stdout.strip() == "ok", r.stderr[-2000:]
