"""Command line: `python -m tcmlab demo|train|sample` (thin wrappers around tcmlab.train / tcmlab.samplers)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .config import preset
from .model import load_model
from .samplers import T_MAX, generate
from .train import train
from .viz import save_samples


def sample_grids(run: Path, out: Path, t_mid: float, n: int = 64, seed: int = 0) -> list[Path]:
    """1-step and 2-step (T → t_mid) sample grids of a run's EMA model as PNG files."""
    m = load_model(run)
    paths = []
    for name, ts in (("1step", (T_MAX,)), ("2step", (T_MAX, t_mid))):
        g = torch.Generator().manual_seed(seed)
        x = generate(m.f, n, m.shape, ts, generator=g, t_prime=m.t_prime)
        paths.append(save_samples(x, out / f"samples_{name}.png"))
    return paths


def cmd_demo(args) -> None:
    out = Path(args.out)
    t0 = time.perf_counter()
    s0, s1, s2 = out / "stage0", out / "stage1", out / "stage2"
    print(f"[tcmlab] preset {args.preset!r}: stage 0 (EDM) -> stage 1 (ECT) -> stage 2 (TCM) in {out}", flush=True)
    train(preset(args.preset, 0), s0)
    train(preset(args.preset, 1, init_from=str(s0)), s1)
    train(preset(args.preset, 2, init_from=str(s1)), s2)
    grids = sample_grids(s1, s1, args.t_mid) + sample_grids(s2, s2, args.t_mid)
    print(f"[tcmlab] done in {time.perf_counter() - t0:.0f} s. Outputs:")
    for d in (s0, s1, s2):
        print(f"  {d}/  (config.json, metrics.jsonl, latest.safetensors)")
    for p in grids:
        print(f"  {p}")


def cmd_train(args) -> None:
    cfg = preset(args.preset, args.stage, **({"init_from": args.init_from} if args.init_from else {}))
    r = train(cfg, args.run, steps=args.steps)
    print(f"[tcmlab] stage {cfg.stage} at step {r.step}: {r.run_dir}")


def cmd_sample(args) -> None:
    for p in sample_grids(Path(args.run), Path(args.out or args.run), args.t_mid, n=args.n, seed=args.seed):
        print(p)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tcmlab", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="stage 0 -> 1 -> 2 on a preset, with sample grids")
    d.add_argument("--preset", default="digits")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--t-mid", type=float, default=1.0, help="intermediate time of 2-step sampling (TCM App. E)")
    t = sub.add_parser("train", help="train (or continue) one stage")
    t.add_argument("--preset", default="digits")
    t.add_argument("--stage", type=int, required=True, choices=(0, 1, 2))
    t.add_argument("--run", required=True, help="run directory (created, or resumed if it holds a checkpoint)")
    t.add_argument("--init-from", help="run directory of the previous stage")
    t.add_argument("--steps", type=int, help="at most this many more steps in this call")
    s = sub.add_parser("sample", help="1- and 2-step sample grids of a run")
    s.add_argument("run")
    s.add_argument("--out")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--t-mid", type=float, default=1.0)
    args = ap.parse_args(argv)
    try:
        {"demo": cmd_demo, "train": cmd_train, "sample": cmd_sample}[args.cmd](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
