"""What a run directory holds, in a few lines: `python -m tcmlab info RUN` (`describe`, then `report`).

Read-only. The checkpoint's tensors are loaded, so their checksums are checked (docs/decisions.md §21) and a damaged
file is named; its config is compared with its preset's (`rundir.config_diff`: the fields that make another run);
`init_source` says where the run started and, when asked, whether that file is still the one it started from (its
SHA-256); then the compute it spent (train.py's compute record), what metrics.jsonl reports up to the checkpoint's
step (and what a resume would set aside after it), and the scores eval.jsonl holds at that step. Nothing is written.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from . import checkpoint
from .config import PRESETS, RunConfig, from_dict, preset
from .evalsets import POINTS
from .model import checkpoint_path
from .rundir import DISCARDED_NAME, EVAL_NAME, after_step, config_diff, eval_step, read_metrics

STAGE_NAMES = {0: "EDM diffusion pretraining", 1: "ECT consistency training", 2: "TCM truncated training"}
METRIC_ORDER = ("fid", "fid_heun", "dfid")  # eval cards' metrics, in the order `report` lists them
REPORTED_KINDS = ("grad_spike", "nonfinite", "fp16_skip", "config_change")  # metrics.jsonl rows worth counting


def preset_diff(cfg: RunConfig) -> list[str] | str:
    """How a run's config differs from its preset's ("field old -> new", the fields that make another run), or why
    there is nothing to compare with."""
    if cfg.name not in PRESETS:
        return f"preset {cfg.name!r} is not one of this tcmlab ({', '.join(sorted(PRESETS))})"
    if PRESETS[cfg.name][cfg.stage] is None:
        return f"preset {cfg.name!r} has no stage {cfg.stage}"
    return config_diff(preset(cfg.name, cfg.stage, init_from=cfg.init_from), cfg)


def init_file_now(path: str | Path, sha256: str) -> str:
    """Whether the file a run started from is still there and still that file: 'same file', 'changed (...)' or
    'missing'; a relative path (a checkpoint of an older tcmlab records no absolute one) is looked up from the current
    folder, and says so. Hashes the whole file (seconds for a CIFAR-10 checkpoint)."""
    path = Path(path)
    where = "" if path.is_absolute() else " (a relative path, looked up from the current folder)"
    if not path.is_file():
        return "missing" + where
    now = checkpoint.sha256(path)
    return ("same file" if now == sha256 else f"changed (sha256 now {now[:12]}…)") + where


def origin(cfg: RunConfig, source: dict | None, verify: bool) -> dict:
    """Where a run started: {'kind': 'scratch' | 'edm_pickle' | 'run' | 'unknown', 'path', 'resolved' (the absolute
    path; absent in checkpoints of an older tcmlab), 'step', 'sha256', and 'now' (`init_file_now`) when `verify`}."""
    if source is None:
        return {"kind": "scratch" if cfg.stage == 0 or cfg.from_scratch else "unknown"}
    kind = "edm_pickle" if str(source["path"]).endswith(".pkl") else "run"
    out = {"kind": kind, **source}
    if verify:
        resolved = source.get("resolved")  # where it was; else (a moved tree) the recorded path from here
        out["now"] = init_file_now(resolved if resolved and Path(resolved).is_file() else source["path"],
                                   source["sha256"])
    return out


def metrics_summary(path: Path, step: int) -> dict:
    """metrics.jsonl up to the checkpoint's `step` (the last train row, counts of REPORTED_KINDS), after it (rows a
    resume sets aside) and the rows earlier resumes set aside (metrics.discarded.jsonl: a `nonfinite` stop's report
    ends there); {'present': False} without the file, 'error' if unreadable."""
    if not path.exists():
        return {"present": False}
    try:
        rows = read_metrics(path)  # every row an object (read_metrics refuses others)
    except ValueError as e:
        return {"present": True, "error": str(e)}
    kept = [r for r in rows if not after_step(r, step)]
    train_rows = [r for r in kept if r.get("kind") == "train"]
    # what earlier starts set aside: the stretch after a checkpoint that a stopped call did (a nonfinite stop)
    discarded = _readable_rows(path.with_name(DISCARDED_NAME))[0]
    return {"present": True, "last_train": train_rows[-1] if train_rows else None,
            "reported": dict(Counter(r["kind"] for r in kept if r.get("kind") in REPORTED_KINDS)),
            "after_checkpoint": dict(Counter(str(r.get("kind")) for r in rows if after_step(r, step))),
            "set_aside_earlier": dict(Counter(str(r.get("kind")) for r in discarded))}


def _readable_rows(path: Path) -> tuple[list[dict], str | None]:
    """A JSON-lines record's rows and None; where a line cannot be read, the rows of the lines that can, and what is
    wrong."""
    try:
        return read_metrics(path), None
    except ValueError as e:
        rows = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows, str(e)


def scores_at(rows: list[dict], step: int) -> list[dict]:
    """The scores eval.jsonl's `rows` hold for the checkpoint's `step`: the latest row of each eval card (cards that differ
    in anything, n, weights, seed or draws included, are kept apart), EMA weights first."""
    latest = {}
    for r in rows:
        if eval_step(r) == step:
            latest[json.dumps({k: v for k, v in r["card"].items() if k != "step"}, sort_keys=True)] = r

    def order(r):
        c = r["card"]
        m = c.get("metric")
        return (c.get("weights") != "ema", METRIC_ORDER.index(m) if m in METRIC_ORDER else len(METRIC_ORDER),
                len(c.get("steps", ())), [float(s) for s in c.get("steps", ())], json.dumps(c, sort_keys=True))

    return [{"metric": r["card"].get("metric"), "steps": list(r["card"].get("steps", ())), "score": r.get("fid"),
             "n": r["card"].get("n"), "weights": r["card"].get("weights"), "seed": r["card"].get("seed"),
             "draws": r["card"].get("draws", 1), "extractor": r["card"].get("extractor"),
             "nonfinite": r.get("nonfinite")} for r in sorted(latest.values(), key=order)]


def describe(run: str | Path, verify_init: bool = False) -> dict:
    """A run directory (or its checkpoint file) as a dict: path, stage, preset, step, steps, batch, changed
    (`preset_diff`), tensors, checksummed, origin, compute, metrics (`metrics_summary`), eval (`scores_at`)."""
    ckpt = checkpoint_path(run)
    state, about = checkpoint.load_with_metadata(ckpt)  # a missing or damaged file raises here, saying what to do
    cfg = from_dict(json.loads(state["config"]))
    step = int(state["step"])
    evals, eval_error = _readable_rows(ckpt.parent / EVAL_NAME)
    return {"path": str(ckpt.parent), "checkpoint": str(ckpt), "stage": cfg.stage, "preset": cfg.name,
            "step": step, "steps": cfg.train.steps, "batch": cfg.train.batch, "changed": preset_diff(cfg), **about,
            "origin": origin(cfg, state.get("init_source"), verify_init), "compute": state.get("compute"),
            "metrics": metrics_summary(ckpt.parent / "metrics.jsonl", step),
            "eval": scores_at(evals, step), "eval_error": eval_error}


def finite_or_none(obj):
    """obj with every non-finite float replaced by None (JSON has no NaN or inf)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def _duration(seconds: float) -> str:
    """Seconds as '12.3 s', or as hours from 0.1 h on."""
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds:.1f} s"


def _score_name(e: dict) -> str:
    """How `evaluate` names a score: FID (energy distance on 2-D points), k-step with its times, or EDM's Heun."""
    what = "energy distance" if e["extractor"] == POINTS else "FID"
    if e["metric"] == "fid_heun":
        return f"{what} of EDM's Heun sampler ({len(e['steps'])} times)"
    return f"{what} {len(e['steps'])}-step ({' → '.join(f'{s:g}' for s in e['steps'])})"


def _scores_line(scores: list[dict]) -> str:
    """One line per card group (n, weights, seed, draws, extractor): its scores, dFID_t gathered."""
    groups: dict[str, list[dict]] = {}
    for e in scores:
        key = (f"n = {e['n']}, {e['weights']} weights, seed {e['seed']}"
               + (f", mean of {e['draws']} draws" if e["draws"] > 1 else "") + f", extractor {e['extractor']}")
        groups.setdefault(key, []).append(e)
    value = lambda e: f"{e['score']:.4g}" if isinstance(e["score"], (int, float)) else "none"
    lines = []
    for key, es in groups.items():
        parts = [f"{_score_name(e)}: {value(e)}" for e in es if e["metric"] != "dfid"]
        dfid = [f"{e['steps'][0]:g}: {value(e)}" for e in es if e["metric"] == "dfid" and e["steps"]]
        points = " (energy distance)" if es[0]["extractor"] == POINTS else ""
        parts += [f"dFID_t{points} at t = {', '.join(dfid)}"] if dfid else []
        lines.append(f"    ({key}) {'; '.join(parts)}")
    return "\n".join(lines)


def report(d: dict) -> str:
    """`describe`'s dict as the lines `python -m tcmlab info` prints."""
    done = "finished" if d["step"] >= d["steps"] else f"{d['steps'] - d['step']} steps to go"
    sums = "checksums ok" if d["checksummed"] else "no checksums (written by an older tcmlab)"
    changed = d["changed"] if isinstance(d["changed"], str) else (
        "as the preset" if not d["changed"] else f"differs from the preset in {', '.join(d['changed'])}")
    lines = [f"{d['path']}: step {d['step']} of {d['steps']} ({done}); {d['tensors']} tensors, {sums}",
             f"  stage {d['stage']} ({STAGE_NAMES[d['stage']]}), preset {d['preset']!r}: {changed}"]
    o = d["origin"]
    if o["kind"] in ("run", "edm_pickle"):
        what = (f"EDM pickle {o['path']}" if o["kind"] == "edm_pickle" else f"{o['path']} at its step {o['step']}")
        now = f"; now: {o['now']}" if "now" in o else "; --verify-init compares it with the file now"
        lines.append(f"  started from {what} (sha256 {o['sha256'][:12]}…{now})")
    else:
        lines.append("  started from random weights" if o["kind"] == "scratch" else "  started from: not recorded")
    c = d["compute"]
    if c is not None:
        since = f" (times counted from step {c['since_step']})" if c.get("since_step") else ""
        lines.append(f"  compute: {d['step'] * d['batch']:,} images seen; {_duration(c['train_seconds'])} of "
                     f"training, {_duration(c['device_seconds'])} of device time{since}")
    else:
        lines.append("  compute: not recorded (a checkpoint of an older tcmlab)")
    m = d["metrics"]
    if not m["present"]:
        lines.append("  metrics.jsonl: absent")
    elif "error" in m:
        lines.append(f"  metrics.jsonl: unreadable ({m['error']})")
    else:
        t = m["last_train"]
        if t is not None:
            top = t.get("grad_norm_max")
            top = f" (largest since the row before: {top:.4g})" if isinstance(top, (int, float)) else ""
            lines.append(f"  last train row, step {t['step']}: loss {t['loss']:.4g}, gradient norm "
                         f"{t['grad_norm']:.4g}{top}")
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(m["reported"].items()))
        none = "no spikes, non-finite stops, fp16 skips or config changes"
        lines.append(f"  metrics.jsonl reports: {counts or none}")
        if m["after_checkpoint"]:
            later = ", ".join(f"{n} {kind}" for kind, n in sorted(m["after_checkpoint"].items()))
            lines.append(f"  after the checkpoint's step (a stopped call; set aside when the run resumes): {later}")
        if m["set_aside_earlier"]:
            earlier = ", ".join(f"{n} {kind}" for kind, n in sorted(m["set_aside_earlier"].items()))
            lines.append(f"  set aside by earlier resumes ({DISCARDED_NAME}): {earlier}")
    if d.get("eval_error"):
        lines.append(f"  eval.jsonl: {d['eval_error']} The scores below are those of its readable lines.")
    if d["eval"]:
        lines.append(f"  eval.jsonl at step {d['step']}:\n{_scores_line(d['eval'])}")
    else:
        lines.append(f"  eval.jsonl: no scores at step {d['step']} (python -m tcmlab evaluate {d['path']})")
    return "\n".join(lines)
