"""Command line: `python -m tcmlab demo|train|sample|evaluate|info|sweep|claims` (thin wrappers around tcmlab.train /
samplers / metrics / runinfo / sweep / claims).

Every expected failure (missing, damaged or mismatched files, permissions, a full disk, bad values) ends in one
`error:` line saying what to do, with exit code 2; `--debug` shows the traceback instead. SIGTERM/SIGINT during
training write a checkpoint and exit with 128 + the signal number; the same command resumes.
Training runs verbatim under `torchrun --standalone --nproc_per_node=N -m tcmlab train ...` (option names do not
collide with torchrun's: the run directory is `--outdir`, as in EDM).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import SafetensorError

from . import rundir
from .checkpoint import check_writable
from .config import from_dict, preset, with_overrides
from .model import CKPT_NAME, load_model
from .sweep import EXECUTORS, Dispatch, load_spec, run_sweep
from .train import Interrupted, train
from .viz import sample_grids


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_dir_of(run: str | Path) -> Path:
    """The run directory of a run directory or of a checkpoint file inside one."""
    run = Path(run)
    return run if run.is_dir() else run.parent


def home_of(run: str | Path) -> Path | None:
    """The run directory whose own checkpoint `run` is (a run directory itself, or the folder of its checkpoint
    file); None for any other checkpoint file."""
    run = Path(run)
    return run if run.is_dir() else run.parent if run.name == CKPT_NAME else None


def own_folder(run: str | Path, what: str) -> Path:
    """The folder where `what` of the checkpoint `run` go: its run directory, unless `run` is another checkpoint file
    lying in a run directory that has its own (the outputs would be read as that run's)."""
    folder = run_dir_of(run)
    if home_of(run) is None and (folder / CKPT_NAME).exists():
        raise ValueError(f"{run} lies in the run directory {folder}, which holds another checkpoint ({CKPT_NAME}): "
                         f"{what} would be read as that run's. Give this checkpoint a folder of its own, or the "
                         f"run directory itself")
    return folder


def cmd_demo(args) -> None:
    out = Path(args.out or ("runs/demo" if args.preset == "digits" else f"runs/demo/{args.preset}"))
    t0 = time.perf_counter()
    s0, s1, s2 = out / "stage0", out / "stage1", out / "stage2"
    tcm = preset(args.preset, 2).loss  # the last step samples stage 2 T -> t_mid: checked before the training
    if not tcm.t_prime <= args.t_mid < tcm.t_max:
        raise ValueError(f"--t-mid {args.t_mid:g} must be in [t′, T) = [{tcm.t_prime:g}, {tcm.t_max:g}) of preset "
                         f"{args.preset!r}: the demo's stage 2 is trained on [t′, T] only")
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
    if args.config and (args.stage is not None or args.preset is not None):
        raise ValueError("--config FILE holds the whole config (its stage and preset included): give it without "
                         "--stage/--preset, or those without --config")
    if args.config:
        try:
            cfg = from_dict(json.loads(Path(args.config).read_text()), strict=True)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"--config {args.config} is not a tcmlab RunConfig JSON ({e})") from None
    elif args.stage is None:
        raise ValueError("give --stage (with --preset), or --config FILE")
    else:
        cfg = preset(args.preset or "digits", args.stage)
    cfg = with_overrides(cfg, args.set + ([f"init_from={args.init_from}"] if args.init_from else []))
    unused = [f"--{k.replace('_', '-')}" for k in ("dfid_n", "dfid_t_prime", "data_root", "inception_weights")
              if getattr(args, k) is not None]
    if unused and not args.dfid_every:
        them = "them" if len(unused) > 1 else "it"
        raise ValueError(f"{', '.join(unused)} set{'s' if len(unused) == 1 else ''} up the dFID_t evaluation during "
                         f"training, which runs only with --dfid-every N: add it, or leave {them} out")
    eval_fn = None
    if args.dfid_every:
        from . import evalsets, metrics
        es = evalsets.eval_set(cfg.data, data_root=args.data_root, inception_weights=args.inception_weights)
        t_prime = cfg.loss.t_prime if cfg.stage == 2 else args.dfid_t_prime  # as the sweep's and notebooks' callbacks
        if t_prime is not None and not 0 < t_prime < cfg.t_max:
            raise ValueError(f"--dfid-t-prime must be in (0, T={cfg.t_max:g}), got {t_prime:g}")
        eval_fn = metrics.dfid_callback(es, metrics.dfid_ts_for(cfg.t_max, t_prime), n=args.dfid_n)
    r = train(cfg, args.outdir, steps=args.steps, device=args.device, eval_fn=eval_fn, eval_every=args.dfid_every,
              allow_change=tuple(args.allow_change))
    if os.environ.get("RANK", "0") == "0":
        print(f"[tcmlab] stage {cfg.stage} at step {r.step}: {r.run_dir}")


def cmd_sample(args) -> None:
    m = load_model(args.run, device=args.device)  # a wrong or damaged path fails before any folder is made
    out = Path(args.out) if args.out else own_folder(args.run, "its sample grids")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder for the PNGs (it is created if missing)")
    home = home_of(args.run)
    if (out / CKPT_NAME).exists() and (home is None or out.resolve() != home.resolve()):
        raise ValueError(f"--out {out} is another run's directory: its samples_*.png are that run's (info and resumes "
                         f"read them as such). Give another folder")
    out.mkdir(parents=True, exist_ok=True)
    check_writable(out)
    for p in sample_grids(m, out, args.t_mid, n=args.n, seed=args.seed, batch=args.batch):
        print(p)


def cmd_evaluate(args) -> None:
    from . import evalsets, metrics
    from .checkpoint import atomic_write_text

    t0 = time.perf_counter()
    m = load_model(args.run, which="raw" if args.raw else "ema", device=args.device)
    run_dir = own_folder(args.run, "its scores (eval.jsonl)")
    check_writable(run_dir)
    # A checkpoint's stored paths are data: shown, never followed; the CIFAR-10 folder comes from --data-root.
    es = evalsets.eval_set(m.cfg.data, data_root=args.data_root, inception_weights=args.inception_weights)
    es.cuda = torch.device(args.device).type == "cuda"
    if m.t_prime is not None and args.t_mid < m.t_prime:
        print(f"[tcmlab] --t-mid {args.t_mid:g} is below t′ = {m.t_prime:g} of this stage-2 model (trained on [t′, T] "
              f"only): its 2-step score goes T → t′ instead", flush=True)
    rows = metrics.evaluate_run(m, es, n=args.n, seed=args.seed, t_mid=args.t_mid, batch=args.batch, progress=True,
                        heun_steps=args.heun_steps, draws=args.draws)
    n_q = metrics.floor_n(es, args.n)
    d = {r["card"]["steps"][0]: r["fid"] for r in rows if r["card"]["metric"] == "dfid"}
    path = run_dir / rundir.EVAL_NAME
    with FileLock(str(run_dir / rundir.EVAL_LOCK_NAME)):  # two evaluations of one run at once: neither's rows lost
        old = path.read_text() if path.exists() else ""
        atomic_write_text(path, old + "".join(json.dumps(r) + "\n" for r in rows))
    fl = rows[0]["floor"]
    points = es.extractor == evalsets.POINTS  # toy2d: the 'fid' slot holds the energy distance of the points
    name, digits = ("energy distance", 4) if points else ("FID", 2)
    print(f"[tcmlab] {args.run} step {m.step} ({m.which}), n = {n_q}, reference {es.reference_name}, extractor "
          f"{es.extractor}" + (f", real-vs-real floor at n = {n_q}: {fl:.{digits}f}" if fl is not None else "")
          + (f"; each score the mean over {args.draws} noise draws (± their sd)" if args.draws > 1 else "")
          + (f" (--n {args.n} is more than the {n_q} images the evaluation set holds)" if (args.n or 0) > n_q else ""))

    def fid(r):
        return f"{r['fid']:.{digits}f}" + (f" ± {statistics.stdev(r['fid_draws']):.{digits - 1}f}" if args.draws > 1
                                           else "")

    for r in rows:
        k = len(r["card"]["steps"])
        if r["card"]["metric"] == "fid":
            via = " → ".join(f"{t:g}" for t in r["card"]["steps"])  # a stage-2 model with t′ > t_mid goes through t′
            print(f"  {name} {k}-step ({via}) {fid(r)}   KID {r['kid_mean']:.4g} ± {r['kid_std']:.2g}")
        elif r["card"]["metric"] == "fid_heun":  # stage 0 is a diffusion model: its own sampler, not 1 or 2 steps
            print(f"  {name} Heun, EDM grid of {k} times ({2 * k - 1} calls of D) {fid(r)}   KID "
                  f"{r['kid_mean']:.4g} ± {r['kid_std']:.2g}")
    print(f"  dFID_t{' (energy distance)' if points else ''}: "
          + ", ".join(f"{t:g}: {v:.{digits - 1 if not points else digits}f}" for t, v in d.items()))
    print(f"  appended to {path} in {time.perf_counter() - t0:.1f} s")


def cmd_info(args) -> None:
    from . import runinfo

    d = runinfo.describe(args.run, verify_init=args.verify_init)
    print(json.dumps(runinfo.finite_or_none(d), indent=1, allow_nan=False) if args.json else runinfo.report(d))


def cmd_sweep(args) -> None:
    spec = load_spec(args.spec, out=args.out)
    dispatch = Dispatch(args.executor, args.workers, args.device, args.partition, args.time, args.gpus, args.cpus,
                        args.mem_gb)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops a sweep like Ctrl-C
    try:
        r = run_sweep(spec, dispatch, dry_run=args.dry_run, report_only=args.report_only, png=not args.no_png)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if r.failed:
        first = next(iter(r.failed.items()))
        raise RuntimeError(f"{len(r.failed)} sweep task(s) failed or were not run, first: {first[0]}: {first[1]}. "
                           f"Fix that and run the same command again: finished points are kept")


def cmd_claims(args) -> None:
    from . import claims
    from .checkpoint import atomic_write_text

    spec = load_spec(args.spec)
    where = {}
    for item in args.where:
        column, eq, value = item.partition("=")
        if not eq or not value:
            raise ValueError(f"--where {item}: expected COLUMN=VALUE, e.g. --where s1.loss.d=250")
        where[column] = value
    tb, found = claims.report(spec, args.out, where)
    command = args.command or (f"python -m tcmlab claims {args.spec}" + (f" --out {args.out}" if args.out else "")
                               + "".join(f" --where {w}" for w in args.where))
    images = []
    if args.figures:
        from .claims_plots import all_figures
        from .display import png, png_unavailable

        folder = Path(args.figures)
        folder.mkdir(parents=True, exist_ok=True)
        figs, skipped = all_figures(tb, claims.grid_values(spec))
        for name, why in skipped.items():
            print(f"[claims] no figure {name}: {why}")
        for name, fig in figs.items():
            fig.write_json(folder / f"{name}.json")
            data = png(fig)
            if data is None:
                print(f"[claims] no PNG of {name}: {png_unavailable() or 'kaleido could not render'}")
                continue
            (folder / f"{name}.png").write_bytes(data)
            images.append((name, os.path.relpath(folder / f"{name}.png", Path(args.md).parent if args.md else ".")))
    text = claims.markdown(found, tb, spec, command, images, where)
    if args.md:
        atomic_write_text(Path(args.md), text)
        print(f"[claims] report: {args.md}")
    else:
        print(text)
    if args.readme:
        readme = Path(args.readme)
        link = f" Tables per claim: [{args.md}]({args.md})." if args.md else ""
        block = claims.header(tb, spec, command, where) + link + "\n\n" + claims.summary_table(found)
        atomic_write_text(readme, claims.replace_block(readme.read_text(), block, spec.path))
        print(f"[claims] {readme}: claims block replaced")


def _positive(min_value: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {min_value}, got {text!r}") from None
        if v < min_value:
            raise argparse.ArgumentTypeError(f"expected an integer >= {min_value}, got {v}")
        return v
    return parse


def _path(text: str) -> str:
    """A path argument: not empty (an empty path would mean the current folder without saying so)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty one (give . for the current folder)")
    return text


def _describe(e: BaseException) -> str:
    """One line saying what went wrong and what to do."""
    if isinstance(e, PermissionError):
        return f"permission denied: {e.filename}. Make it writable/readable, or use another path."
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return (f"no space left on the device writing {e.filename or 'a file'}. Free some space and run the same "
                f"command again (the last checkpoint is intact).")
    if isinstance(e, OSError) and e.filename and not isinstance(e, FileNotFoundError):
        return f"{e.strerror or e}: {e.filename}"
    return str(e)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tcmlab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="stage 0 -> 1 -> 2 on a preset, with sample grids")
    d.add_argument("--preset", default="digits")
    d.add_argument("--out", type=_path, help="folder of the three run directories (default runs/demo; another preset "
                                             "than digits: "
                                 "runs/demo/PRESET)")
    d.add_argument("--t-mid", type=float, default=1.0, help="intermediate time of 2-step sampling (TCM App. E)")
    t = sub.add_parser("train", help="train (or continue) one stage; works under torchrun")
    t.add_argument("--preset", help="a preset's name (default digits), with --stage")
    t.add_argument("--stage", type=int, choices=(0, 1, 2), help="stage of the preset (or give --config)")
    t.add_argument("--config", help="a RunConfig JSON file (a run's config.json) instead of --preset/--stage")
    t.add_argument("--outdir", required=True, type=_path,
                   help="run directory (created, or resumed if it holds a checkpoint)")
    t.add_argument("--init-from", help="run directory (or checkpoint file) of the previous stage")
    t.add_argument("--steps", type=_positive(1), help="at most this many more steps in this call")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set train.batch=128 --set net.channels=64 (repeatable)")
    t.add_argument("--allow-change", action="append", default=[], metavar="train.FIELD",
                   help="go on from the run's checkpoint with a new train.lr or train.precision (given with --set), "
                        "e.g. after a non-finite step (repeatable)")
    t.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA when present; under torchrun, LOCAL_RANK's GPU)")
    t.add_argument("--dfid-every", type=_positive(1), default=0, help="log dFID_t every N steps (rank 0)")
    t.add_argument("--dfid-n", type=_positive(2), help="real images noised and denoised per dFID_t")
    t.add_argument("--dfid-t-prime", type=float, help="stages 0/1: also score dFID_t at this t′ (the one a stage 2 "
                                                       "will use), after the grid; stage 2 always scores its own")
    t.add_argument("--data-root", help="CIFAR-10 folder for dFID (the training data come from the config)")
    t.add_argument("--inception-weights", help="local Inception weights (CIFAR-10 dFID; or $TCMLAB_INCEPTION_WEIGHTS)")
    for name, help_ in (("sample", "1- and 2-step sample grids of a run"),
                        ("evaluate", "1-/2-step FID/KID (a stage-0 run: EDM's Heun sampler) and dFID_t of a run, "
                                     "with eval cards (eval.jsonl)")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("run", type=_path, help="run directory or checkpoint file")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--t-mid", type=float, default=1.0, help="intermediate time of 2-step sampling (TCM App. E; "
                       "evaluate raises it to t′ for a stage-2 model with t′ > t_mid)")
        s.add_argument("--device", default=_default_device(), help="default: CUDA when present")
        s.add_argument("--batch", type=_positive(1), default=1024, help="images per network call")
    s = sub.choices["sample"]
    s.add_argument("--out", type=_path, help="folder for the PNGs (default: the run directory)")
    s.add_argument("--n", type=_positive(1), default=64)
    e = sub.choices["evaluate"]
    e.add_argument("--raw", action="store_true", help="score the raw weights instead of the EMA")
    e.add_argument("--heun-steps", type=_positive(2), default=18,
                   help="stage-0 runs: FID of EDM's Heun sampler on this many times (EDM: 18, 35 calls of D)")
    e.add_argument("--n", type=_positive(2), help="images to score (default: the query half / reference size)")
    e.add_argument("--draws", type=_positive(1), default=1,
                   help="noise draws per score, seeds SEED, SEED+1, …: the mean FID is reported with the spread "
                        "over draws (digits at n = 898: one draw's 1-step FID varies by ~20)")
    e.add_argument("--data-root", help="CIFAR-10: folder holding cifar-10-batches-py (never taken from the checkpoint)")
    e.add_argument("--inception-weights", help="local Inception weights file (CIFAR-10; or $TCMLAB_INCEPTION_WEIGHTS)")
    i = sub.add_parser("info", help="what a run directory holds: step, config against its preset, origin, compute, "
                                    "reported events, scores (checks the checkpoint's checksums; writes nothing)")
    i.add_argument("run", type=_path, help="run directory or checkpoint file")
    i.add_argument("--verify-init", action="store_true",
                   help="also hash the file the run started from and say whether it is still that file")
    i.add_argument("--json", action="store_true", help="print the description as JSON")
    w = sub.add_parser("sweep", help="train and evaluate a grid of runs over seeds (TOML spec, e.g. sweeps/ci.toml)",
                       description="Train and evaluate every point of a sweep spec not yet done (resumable), then "
                                   "rebuild results.csv, summary.csv and figures/ in the output folder.")
    w.add_argument("spec", help="sweep spec, a TOML file (format: tcmlab/sweep.py, example: sweeps/ci.toml)")
    w.add_argument("--out", type=_path, help="output folder (default: the spec's `out`)")
    w.add_argument("--executor", choices=EXECUTORS, default="processes",
                   help="processes: worker processes here (default); submitit-local: submitit's local executor; "
                        "slurm: SLURM jobs through submitit; inline: this process, one task at a time")
    w.add_argument("--workers", type=_positive(1), help="tasks in flight at most (default: CPU count; slurm: all)")
    w.add_argument("--device", help="device of every task (default: CUDA when present)")
    w.add_argument("--partition", help="SLURM partition")
    w.add_argument("--time", type=_positive(1), default=60, help="time limit of each job in minutes (submitit)")
    w.add_argument("--gpus", type=_positive(0), default=0, help="GPUs per job (submitit)")
    w.add_argument("--cpus", type=_positive(1), default=1, help="CPUs (and torch threads) per job (submitit)")
    w.add_argument("--mem-gb", type=_positive(1), help="memory per job in GB (submitit)")
    w.add_argument("--no-png", action="store_true", help="figures as .json/.html only (no kaleido rendering)")
    w.add_argument("--dry-run", action="store_true", help="list the points and their status; run nothing")
    w.add_argument("--report-only", action="store_true", help="rebuild the table and figures only; run nothing")
    c = sub.add_parser("claims", help="the paper's claims read off a finished sweep: tables and verdicts (markdown)",
                       description="Read a sweep's results.csv, curves.csv and timing.csv and write each claim's "
                                   "numbers and verdict (rules: tcmlab/claims.py).")
    c.add_argument("spec", help="the sweep's spec (e.g. sweeps/digits_claims.toml)")
    c.add_argument("--out", type=_path, help="folder holding the sweep's CSV files (default: the spec's `out`)")
    c.add_argument("--md", type=_path, help="write the report to this file (default: print it)")
    c.add_argument("--readme", type=_path, help="also replace this README's claims block with the summary table")
    c.add_argument("--command", help="the command the report names as the one that regenerates it")
    c.add_argument("--figures", type=_path,
                   help="write the report's figures here (plotly JSON and PNG) and show them in it")
    c.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                   help="one value of a stage-0/1 grid field, e.g. s1.loss.d=250 (needed where such a field has "
                        "several values; repeatable)")
    return ap


EXPECTED = (ValueError, OSError, RuntimeError, LookupError, ArithmeticError, SafetensorError)


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """Warnings on the command line as one line each, without the library's source line under them."""
    return f"[tcmlab] {category.__name__}: {message}\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    shown, warnings.formatwarning = warnings.formatwarning, _warning_line
    try:
        return _run(args)
    finally:
        warnings.formatwarning = shown


def _run(args) -> int:
    try:
        {"demo": cmd_demo, "train": cmd_train, "sample": cmd_sample, "evaluate": cmd_evaluate,
         "info": cmd_info, "sweep": cmd_sweep, "claims": cmd_claims}[args.cmd](args)
    except Interrupted as e:
        print(f"[tcmlab] {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        if args.debug:
            raise
        what = {"sweep": "running points wrote checkpoints. Run the same command again to resume.",
                "sample": "sample grids are written only when complete. Run the same command again.",
                "evaluate": "eval.jsonl gets a row only when its scores are complete. Run the same command again."}
        print(f"[tcmlab] {args.cmd} interrupted (Ctrl-C); " + what.get(args.cmd, "run the same command again."),
              file=sys.stderr)
        return 130
    except EXPECTED as e:
        if args.debug:
            raise
        print(f"error: {_describe(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
