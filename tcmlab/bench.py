"""Benchmark: step time (and peak memory on CUDA) of stage 0, stage 1, stage 2 with routed teacher passes and
stage 2 with the official full-batch teacher passes, on the same network and batch, measured in one run.

    python -m tcmlab.bench                      # MLP on digits (the `digits` preset network), batch 256
    python -m tcmlab.bench --net unet32         # a DDPM++ U-Net on 32×32×3 synthetic images
    python -m tcmlab.bench --net ddpmpp --precision bf16 --batch 128   # the paper network (GPU)

Variants are interleaved round by round (so drift hits all of them alike); the median step time is reported, with
ratios to the stage-1 step. Target (docs/decisions.md §7): routed stage 2 ≤ 1.05× stage 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from .config import NetConfig, TCMConfig, preset
from .model import AUTOCAST, frozen_copy
from .nets import build_net
from .precond import Precond
from .stages import ECTStage, EDMStage, TCMStage

NETS = {
    "mlp": ((1, 8, 8), preset("digits", 1).net),
    "unet32": ((3, 32, 32), NetConfig(arch="ddpmpp", channels=32, channel_mult=(1, 2, 2), depth=1, dropout=0.2)),
    "ddpmpp": ((3, 32, 32), preset("cifar10", 1).net),
}


def make_steps(net_name: str, batch: int, device, precision: str, teacher_dropout: bool = True):
    """One optimiser step of each variant, through the same stage objects `train()` uses (`tcmlab.stages`), on one
    fixed batch; stage 1 at the end of its curriculum (ratio = ratio_max), stage 2 with the paper's defaults."""
    shape, net_cfg = NETS[net_name]
    torch.manual_seed(0)
    f = Precond(build_net(net_cfg, shape), autocast_dtype=AUTOCAST[precision]).to(device).train()
    f0 = frozen_copy(f).train(teacher_dropout)
    opt = torch.optim.RAdam(f.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((batch, *shape), generator=g).to(device) * 2 - 1
    eps = torch.randn((batch, *shape), generator=g).to(device)
    i_late = 10**9  # ratio(i) = ratio_max
    variants = {"stage0 (EDM)": EDMStage(), "stage1 (ECT)": ECTStage(),
                "stage2 routed": TCMStage(TCMConfig(teacher_passes="routed")),
                "stage2 full (official)": TCMStage(TCMConfig(teacher_passes="full"))}

    def run(stage):
        t, is_b = stage.sample_times(batch, g)
        t, is_b = t.to(device), None if is_b is None else is_b.to(device)

        def step():
            opt.zero_grad(set_to_none=True)
            stage.loss(f, x, eps, t, is_b, i_late, batch, f0=f0).loss.backward()
            opt.step()
        return step

    return {name: run(stage) for name, stage in variants.items()}


def measure(steps: dict, rounds: int, per_round: int, device) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in steps.values():  # warm-up
        for _ in range(2):
            fn()
    times = {k: [] for k in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) / per_round)
    peak = {}
    if device.type == "cuda":
        for name, fn in steps.items():
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            sync()
            peak[name] = torch.cuda.max_memory_allocated(device) / 2**20
    return {k: (statistics.median(v), peak.get(k)) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tcmlab.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--net", choices=sorted(NETS), default="mlp")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--precision", choices=sorted(AUTOCAST), default="fp32")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    steps = make_steps(args.net, args.batch, device, args.precision)
    res = measure(steps, args.rounds, args.per_round, device)
    ref = res["stage1 (ECT)"][0]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"net={args.net} batch={args.batch} precision={args.precision} device={name} "
          f"rounds={args.rounds}x{args.per_round} (median)")
    print(f"{'variant':<24}{'ms/step':>10}{'x stage1':>10}{'peak MiB':>10}")
    for k, (sec, mem) in res.items():
        print(f"{k:<24}{sec * 1e3:>10.2f}{sec / ref:>10.3f}{'' if mem is None else f'{mem:.0f}':>10}")
    routed, full = res["stage2 routed"][0], res["stage2 full (official)"][0]
    print(f"routed/full (official) stage-2 step time: {routed / full:.3f}")
    return res


if __name__ == "__main__":
    main()
