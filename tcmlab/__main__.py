"""Command line: `python -m tcmlab demo|train|sample|evaluate` (thin wrappers around tcmlab.train / tcmlab.samplers)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .config import preset
from .model import load_model
from .samplers import generate
from .train import train
from .viz import save_samples


def sample_grids(run: Path, out: Path, t_mid: float, n: int = 64, seed: int = 0) -> list[Path]:
    """1-step and 2-step (T → t_mid) sample grids of a run's EMA model as PNG files."""
    m = load_model(run)
    paths = []
    for name, ts in (("1step", (m.t_max,)), ("2step", (m.t_max, t_mid))):
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


def cmd_evaluate(args) -> None:
    import json

    from . import metrics
    from .checkpoint import atomic_write_text

    t0 = time.perf_counter()
    m = load_model(args.run, which="raw" if args.raw else "ema")
    if m.cfg.data.name == "digits":
        es = metrics.digits_eval_set()
    elif m.cfg.data.name == "cifar10":
        es = metrics.cifar10_eval_set(m.cfg.data.root, args.inception_weights)
    else:
        raise ValueError(f"evaluation needs image data (digits or cifar10), this run trained on {m.cfg.data.name!r}")
    g = torch.Generator().manual_seed(args.seed)
    ts = sorted(set(metrics.dfid_ts(m.t_max)) | ({m.t_prime} if m.t_prime else set()))
    d = metrics.dfid(m.f, es, ts, n=args.n, generator=g)
    rows = metrics.sample_quality(m, es, t_mid=args.t_mid, n=args.n, seed=args.seed)
    n_q = metrics.floor_n(es, args.n)
    rows += [{"card": metrics.asdict(metrics.dfid_card(es, t, n_q, m.which, args.seed, m.step)), "fid": v,
              "floor": rows[0]["floor"], "floor_n": n_q} for t, v in d.items()]
    path = Path(args.run) / "eval.jsonl"
    old = path.read_text() if path.exists() else ""
    atomic_write_text(path, old + "".join(json.dumps(r) + "\n" for r in rows))
    fl = rows[0]["floor"]
    print(f"[tcmlab] {args.run} step {m.step} ({m.which}), n = {n_q}, reference {es.reference_name}, extractor "
          f"{es.extractor}" + (f", real-vs-real floor at n = {n_q}: {fl:.2f}" if fl is not None else ""))
    for r in rows[:2]:
        print(f"  FID {len(r['card']['steps'])}-step {r['fid']:.2f}   KID {r['kid_mean']:.4g} ± {r['kid_std']:.2g}")
    print("  dFID_t: " + ", ".join(f"{t:g}: {v:.1f}" for t, v in d.items()))
    print(f"  appended to {path} in {time.perf_counter() - t0:.1f} s")


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
    e = sub.add_parser("evaluate", help="1-/2-step FID/KID and dFID_t of a run, with eval cards (eval.jsonl)")
    e.add_argument("run")
    e.add_argument("--raw", action="store_true", help="score the raw weights instead of the EMA")
    e.add_argument("--n", type=int, help="images to score (default: the reference size)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--t-mid", type=float, default=1.0)
    e.add_argument("--inception-weights", help="local Inception weights file (CIFAR-10; or $TCMLAB_INCEPTION_WEIGHTS)")
    args = ap.parse_args(argv)
    try:
        {"demo": cmd_demo, "train": cmd_train, "sample": cmd_sample, "evaluate": cmd_evaluate}[args.cmd](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
