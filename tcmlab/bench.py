"""Benchmark: step time and peak memory of stage 0, stage 1, stage 2 with routed teacher passes and stage 2 with the
official full-batch teacher passes, on the same network and batch, measured in one run (docs/decisions.md §7).

    python -m tcmlab.bench                      # MLP on digits (the `digits` preset network), batch 256
    python -m tcmlab.bench --net unet32 --batch 32   # a reduced-width DDPM++ U-Net on 32×32×3 (CPU-sized)
    python -m tcmlab.bench --net ddpmpp --batch 128 --device cuda --precision bf16 --compile --channels-last
    python -m tcmlab.bench --net ddpmpp --batch 128 --device cuda --compare-recipes   # stage 1: fp32 vs fast recipe
    python -m tcmlab.bench --profile            # also torch.profiler's top ops of stage 1 and routed stage 2

One timed step is what `train()` does per step and stage: draw t with the stage's `sample_times` (on the host, from
a torch.Generator), move t to the device, loss, backward, optimiser step. Data indices and ε are drawn outside the
step (the same work for every stage). Variants are interleaved round by round (by default one step per round, 40
rounds, the order reversed every other round), so drift and the load of other processes hit all of them alike; the
median over rounds is reported with ratios to the stage-1 step. Target (docs/decisions.md §7): routed stage 2 ≤ 1.05×
stage 1 in time and in peak memory.

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` over one step (everything the caching allocator holds for
tensors: weights, optimiser state, activations). On the CPU, torch keeps no allocator statistics, so it is the
bytes of the tensors resident at the start of a step (weights and buffers, optimiser state, x, ε) plus the largest
rise of the allocated bytes during one step, from torch.profiler's memory events (profile_memory=True; every torch
allocation and free is recorded). Host memory of numpy/scipy and Python objects is not counted. θ0 is counted for
stage 2 only (the benchmark keeps one θ0 for all variants; stages 0 and 1 do not hold one in training); the record
also gives every peak without θ0's weights, the part of the stage-2 cost that the teacher-pass strategy controls.

A JSON record (`--json`, default `bench-<net>.json`) holds the command line, device, torch version and per-variant
ms/step, peak memory and ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import checkpoint
from .config import NetConfig, TCMConfig, TrainConfig, preset
from .model import frozen_copy
from .nets import build_net
from .precision import AUTOCAST, float32_math
from .precond import Precond
from .speedups import compile_settings, compile_stats, compiled, memory_format
from .stages import ECTStage, EDMStage, TCMStage
from .train import make_optimizer

NETS = {
    "mlp": ((1, 8, 8), preset("digits", 1).net),
    "unet32": ((3, 32, 32), NetConfig(arch="ddpmpp", channels=32, channel_mult=(1, 2, 2), depth=1, dropout=0.2)),
    "ddpmpp": ((3, 32, 32), preset("cifar10", 1).net),  # the paper's 55.7M-parameter CIFAR-10 network
}
REF = "stage1 (ECT)"
ROUTED, FULL = "stage2 routed", "stage2 full (official)"
STAGES = {"stage0 (EDM)": EDMStage(), REF: ECTStage(), ROUTED: TCMStage(TCMConfig(teacher_passes="routed")),
          FULL: TCMStage(TCMConfig(teacher_passes="full"))}
I_LATE = 10**9  # stage 1 at the end of its curriculum: ratio(i) = ratio_max
TARGET_STAGE2 = 1.05  # docs/decisions.md §7
TARGET_RECIPE = 1.3  # stage-1 throughput of bf16 + channels_last + compile over the fp32 recipe (GPU)


def build_pair(net_name: str, device, precision: str, channels_last: bool, teacher_dropout: bool = True):
    """The student f (train mode, seed 0) and θ0 = its frozen copy (dropout as `teacher_dropout`, §8)."""
    shape, net_cfg = NETS[net_name]
    torch.manual_seed(0)
    f = Precond(build_net(net_cfg, shape), autocast_dtype=AUTOCAST[precision])
    f = f.to(device, memory_format=memory_format(channels_last, 4)).train()
    f0 = frozen_copy(f).train(teacher_dropout)
    return f, f0


def fixed_batch(net_name: str, batch: int, device, channels_last: bool):
    """One fixed (x, ε) pair on `device`: x uniform in [−1, 1], ε standard normal."""
    shape = NETS[net_name][0]
    g = torch.Generator().manual_seed(0)
    x = torch.rand((batch, *shape), generator=g) * 2 - 1
    eps = torch.randn((batch, *shape), generator=g)
    fmt = memory_format(channels_last, len(shape) + 1)
    return x.to(device, memory_format=fmt), eps.to(device, memory_format=fmt)


def train_step(stage, f, f0, opt, x, eps, generator: torch.Generator, precision: str = "fp32"):
    """One optimiser step as `train()` runs it for one micro-batch: t from `stage.sample_times` (host), loss,
    backward, step, under train()'s float32 flags for `precision` (TF32 off unless 'tf32', cuDNN benchmark on)."""
    batch = x.shape[0]
    with float32_math(precision, cudnn_benchmark=TrainConfig.cudnn_benchmark):
        t, is_b = stage.sample_times(batch, generator)
        t, is_b = t.to(x.device), None if is_b is None else is_b.to(x.device)
        opt.zero_grad(set_to_none=True)
        stage.loss(f, x, eps, t, is_b, I_LATE, batch, f0=f0).loss.backward()
        opt.step()


def make_steps(net_name: str, batch: int, device, precision: str = "fp32", channels_last: bool = False,
               compile: bool = False, teacher_dropout: bool = True, names=tuple(STAGES), foreach: bool = True) -> dict:
    """name -> (step(), state) for each stage variant on one shared network, optimiser and fixed batch; `state` is
    what stays resident between steps (for the CPU memory figure). The optimiser is train()'s (`make_optimizer`:
    RAdam, foreach unless `foreach=False`)."""
    f, f0 = build_pair(net_name, device, precision, channels_last, teacher_dropout)
    opt = make_optimizer(f.parameters(), TrainConfig(lr=1e-5), foreach=foreach)
    x, eps = fixed_batch(net_name, batch, device, channels_last)
    fc, f0c = compiled(f, f0) if compile else (f, f0)
    g = torch.Generator().manual_seed(0)
    state = {"f": f, "f0": f0, "opt": opt, "x": x, "eps": eps}
    return {name: (lambda s=STAGES[name]: train_step(s, fc, f0c, opt, x, eps, g, precision),
                   {**state, "stage": STAGES[name]}) for name in names}


def make_recipe_steps(net_name: str, batch: int, device) -> dict:
    """Stage 1 under the official fp32 recipe (TF32 off, cuDNN benchmark on), under TF32 (one flag, for scale) and
    under bf16 + channels_last + torch.compile, each with its own network and optimiser (same seed, same batch)."""
    out = {}
    for name, (precision, fast) in {"stage1 fp32": ("fp32", False), "stage1 tf32": ("tf32", False),
                                    "stage1 bf16+channels_last+compile": ("bf16", True)}.items():
        out.update({name: make_steps(net_name, batch, device, precision, fast, fast, names=(REF,))[REF]})
    return out


def make_foreach_steps(net_name: str, batch: int, device) -> dict:
    """Stage 1 with RAdam's per-parameter loop (torch's CPU default) and with its foreach update (train()'s), each
    with its own network and optimiser (same seed, same batch)."""
    return {f"stage1 RAdam {name}": make_steps(net_name, batch, device, names=(REF,), foreach=fe)[REF]
            for name, fe in (("loop", False), ("foreach", True))}


def sync_fn(device):
    """Wait for `device`'s queued work (the device itself: a bare synchronize waits on the current one only)."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def time_steps(steps: dict, rounds: int, per_round: int, device, warmup: int = 2) -> dict:
    """name -> list of per-round mean step times (s); variants interleaved round by round, in reversed order every
    other round (so no variant always runs right after the same other one)."""
    sync = sync_fn(device)
    for fn, _ in steps.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in steps}
    for i in range(rounds):
        for name in list(steps)[::(-1) ** i]:
            fn = steps[name][0]
            sync()
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) / per_round)
    return times


def tensor_bytes(state: dict, with_theta0: bool = True) -> int:
    """Bytes of the distinct tensors resident between steps: f and (if `with_theta0`) θ0 (parameters, buffers,
    gradients), the optimiser state, x and ε."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for m in (state["f"], state["f0"]) if with_theta0 else (state["f"],):
        for t in [*m.parameters(), *m.buffers()]:
            add(t)
            add(t.grad)
    for s in state["opt"].state.values():
        for t in s.values():
            add(t)
    add(state["x"])
    add(state["eps"])
    return total


def cpu_step_rise(fn) -> int:
    """Largest rise of torch's allocated CPU bytes during one call of `fn` (torch.profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        level += e.nbytes()
        peak = max(peak, level)
    return peak


def peak_memory(steps: dict, device) -> tuple[dict, dict]:
    """(name -> peak MiB of one step, name -> the same without θ0's weights), method in the module doc."""
    peak, without = {}, {}
    for name, (fn, state) in steps.items():
        fn()  # gradients and optimiser state exist, as in the middle of training
        theta0 = tensor_bytes(state) - tensor_bytes(state, with_theta0=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            torch.cuda.synchronize(device)
            total = torch.cuda.max_memory_allocated(device)
        else:
            state["opt"].zero_grad(set_to_none=True)  # the step frees nothing allocated before the profiler started
            total = tensor_bytes(state) + cpu_step_rise(fn)
        without[name] = (total - theta0) / 2**20
        peak[name] = without[name] + (theta0 / 2**20 if state["stage"].needs_teacher else 0.0)
    return peak, without


def memory_method(device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated over one step, minus theta0's bytes for stages without a teacher"
    return ("resident tensor bytes (f, theta0 in stage 2 only, optimiser state, x, eps) + largest rise of allocated "
            "bytes during one step (torch.profiler memory events)")


def profile_top_ops(fn, device, steps: int = 3, top: int = 12) -> list[dict]:
    """torch.profiler over `steps` calls of `fn`: the `top` ops by self time (CPU, or CUDA on a GPU)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    sync = sync_fn(device)
    sync()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        sync()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    avgs = sorted(prof.key_averages(), key=lambda a: getattr(a, key), reverse=True)
    total = sum(getattr(a, key) for a in avgs) or 1
    return [{"op": a.key, "ms_per_step": getattr(a, key) / 1e3 / steps, "share": getattr(a, key) / total,
             "calls_per_step": a.count / steps} for a in avgs[:top]]


def ratios(values: dict, ref: str) -> dict:
    """value / value[ref] for every variant (None where a value is missing)."""
    base = values.get(ref)
    return {k: (None if v is None or not base else v / base) for k, v in values.items()}


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def paired_ratio(times: dict, name: str, ref: str) -> float:
    """Median over rounds of (time of `name` / time of `ref` in the same round): drift between rounds cancels."""
    return statistics.median(a / b for a, b in zip(times[name], times[ref]))


def build_record(args, argv: list[str], device, times: dict, peaks: dict, peaks_without_theta0: dict,
                 ref: str) -> dict:
    """The JSON record: command, environment and, per variant, median ms/step, peak MiB and ratios to `ref`."""
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    t_ratio, m_ratio, m0_ratio = ratios(ms, ref), ratios(peaks, ref), ratios(peaks_without_theta0, ref)
    variants = {k: {"ms_per_step": ms[k], "ms_per_round": [s * 1e3 for s in times[k]],
                    "images_per_sec": args.batch / ms[k] * 1e3, "time_ratio_to_ref": t_ratio[k],
                    "time_ratio_to_ref_paired": paired_ratio(times, k, ref),
                    "peak_mib": peaks.get(k), "memory_ratio_to_ref": m_ratio.get(k),
                    "peak_mib_without_theta0": peaks_without_theta0.get(k),
                    "memory_ratio_to_ref_without_theta0": m0_ratio.get(k)} for k in ms}
    rec = {"command": "python -m tcmlab.bench " + shlex.join(argv), "argv": argv, "reference": ref,
           "threads": torch.get_num_threads(),
           "net": args.net, "batch": args.batch, "precision": args.precision, "compile": args.compile,
           "channels_last": args.channels_last, "cudnn_benchmark": TrainConfig.cudnn_benchmark,
           "rounds": args.rounds, "per_round": args.per_round,
           "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
           "python": platform.python_version(), "git_commit": git_commit(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "memory_method": memory_method(device),
           "variants": variants}
    if ROUTED in ms and FULL in ms:
        rec["routed_over_full"] = {"time": ms[ROUTED] / ms[FULL],
                                   "memory": None if peaks.get(FULL) is None else peaks[ROUTED] / peaks[FULL]}
        if REF in ms:
            met = lambda r: None if r is None else r <= TARGET_STAGE2  # noqa: E731
            rec["target"] = {"stage2_routed_over_stage1": TARGET_STAGE2, "met_time": met(t_ratio[ROUTED]),
                             "met_memory": met(m_ratio.get(ROUTED)),
                             "met_memory_without_theta0": met(m0_ratio.get(ROUTED))}
    if args.compare_foreach:
        rec["foreach_speedup"] = ms[ref] / ms["stage1 RAdam foreach"]
    if args.compare_recipes:
        fast = "stage1 bf16+channels_last+compile"
        rec["recipe_speedup"] = ms[ref] / ms[fast]
        rec["tf32_speedup"] = ms[ref] / ms["stage1 tf32"]
        rec["target"] = {"recipe_speedup": TARGET_RECIPE, "met": rec["recipe_speedup"] >= TARGET_RECIPE}
    if args.compile or args.compare_recipes:
        rec["compile_stats"] = compile_stats()
    return rec


def print_record(rec: dict) -> None:
    print(f"net={rec['net']} batch={rec['batch']} precision={rec['precision']} compile={rec['compile']} "
          f"channels_last={rec['channels_last']} device={rec['device']} torch={rec['torch']} "
          f"rounds={rec['rounds']}x{rec['per_round']} (median)")
    print(f"{'variant':<36}{'ms/step':>10}{'x ref':>8}{'paired':>8}{'peak MiB':>10}{'x ref':>8}{'w/o θ0':>8}")
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    for k, v in rec["variants"].items():
        print(f"{k:<36}{v['ms_per_step']:>10.2f}{v['time_ratio_to_ref']:>8.3f}{v['time_ratio_to_ref_paired']:>8.3f}"
              f"{fmt(v['peak_mib'], '.1f'):>10}{fmt(v['memory_ratio_to_ref'], '.3f'):>8}"
              f"{fmt(v['memory_ratio_to_ref_without_theta0'], '.3f'):>8}")
    print(f"(ref = {rec['reference']}; x ref: ratio of medians; paired: median of per-round ratios; w/o θ0: memory "
          f"ratio without θ0's weights; peak memory: {rec['memory_method']})")
    if "routed_over_full" in rec:
        r = rec["routed_over_full"]
        mem = "" if r["memory"] is None else f", memory {r['memory']:.3f}"
        print(f"routed/full (official) stage 2: time {r['time']:.3f}{mem}")
    if "foreach_speedup" in rec:
        print(f"stage-1 step, RAdam foreach over its per-parameter loop: {rec['foreach_speedup']:.3f}x faster")
    if "recipe_speedup" in rec:
        print(f"stage-1 throughput, bf16+channels_last+compile over fp32: {rec['recipe_speedup']:.3f}x "
              f"(target >= {TARGET_RECIPE}); tf32 over fp32: {rec['tf32_speedup']:.3f}x")
    if "compile_stats" in rec:
        c = rec["compile_stats"]
        print(f"torch.compile: {c['stats']}, {c['graph_breaks']} graph breaks; recompile limit hit by "
              f"{c['recompile_limit_hit']} functions")


def print_profile(name: str, ops: list[dict]) -> None:
    print(f"-- torch.profiler, {name}: top ops by self time per step")
    for o in ops:
        print(f"   {o['op']:<40}{o['ms_per_step']:>9.2f} ms{o['share']:>8.1%}{o['calls_per_step']:>8.0f} calls")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m tcmlab.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--net", choices=sorted(NETS), default="mlp")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--precision", choices=sorted(AUTOCAST), default="fp32")
    ap.add_argument("--compile", action="store_true", help="torch.compile f and θ0")
    ap.add_argument("--channels-last", action="store_true", help="weights and images in channels_last")
    # one step per round, many rounds: on a shared VM the speed drifts within seconds (docs/performance.md)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--per-round", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compare-recipes", action="store_true",
                    help="stage 1 only: official fp32 vs bf16 + channels_last + torch.compile (target >= 1.3x)")
    ap.add_argument("--compare-foreach", action="store_true",
                    help="stage 1 only: RAdam's per-parameter loop vs its foreach update (what train() uses)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of stage 1 and stage 2")
    ap.add_argument("--json", default=None, help="where to write the record (default bench-<net>.json)")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.rounds < 1 or args.per_round < 1:
        ap.error("--batch, --rounds and --per-round must be >= 1")
    return args


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise SystemExit(f"--device {args.device}: {e} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    if args.compare_recipes and args.compare_foreach:
        raise SystemExit("--compare-recipes and --compare-foreach are separate runs: give one")
    path = Path(args.json or f"bench-{args.net}.json")
    if path.is_dir() or not path.parent.is_dir():  # before minutes of timing, not after
        raise SystemExit(f"--json {path}: " + ("a folder; give a file name" if path.is_dir() else
                                               f"the folder {path.parent} does not exist"))
    try:
        checkpoint.check_writable(path.parent)
    except OSError as e:
        raise SystemExit(f"--json {path}: cannot write in {path.parent} ({e.strerror}); give another path") from None
    if args.compare_recipes:
        steps, ref = make_recipe_steps(args.net, args.batch, device), "stage1 fp32"
    elif args.compare_foreach:
        steps, ref = make_foreach_steps(args.net, args.batch, device), "stage1 RAdam loop"
    else:
        steps, ref = make_steps(args.net, args.batch, device, args.precision, args.channels_last, args.compile), REF
    # compiling happens at the first calls: under train.compile's settings, restored afterwards
    with compile_settings() if args.compile or args.compare_recipes else contextlib.nullcontext():
        times = time_steps(steps, args.rounds, args.per_round, device)
        peaks, peaks_without_theta0 = ({}, {}) if args.no_memory else peak_memory(steps, device)
        rec = build_record(args, argv, device, times, peaks, peaks_without_theta0, ref)
        if args.profile:
            rec["profile"] = {k: profile_top_ops(steps[k][0], device) for k in (ref, ROUTED) if k in steps}
    print_record(rec)
    for k, ops in rec.get("profile", {}).items():
        print_profile(k, ops)
    path.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"record written to {path}")
    return rec


if __name__ == "__main__":
    main()
