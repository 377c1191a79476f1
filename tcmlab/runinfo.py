"""What a run directory holds, in a few lines: `python -m tcmlab info RUN` (`describe`, then `report`).

Read-only. The checkpoint's tensors are loaded, so their checksums are checked (docs/decisions.md §21) and a damaged
file is named; its config is compared with its preset's (`rundir.config_diff`, the fields that make another run);
`init_source` says where the run started and, with `verify_init`, whether that file is still the one it started
from (its SHA-256); the compute it spent (`train.py`'s compute record), and what metrics.jsonl and eval.jsonl report
at the checkpoint's step. Nothing is written.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from safetensors import safe_open

from . import checkpoint
from .config import PRESETS, from_dict, preset
from .model import checkpoint_path
from .rundir import EVAL_NAME, config_diff, read_metrics

STAGE_NAMES = {0: "EDM diffusion pretraining", 1: "ECT consistency training", 2: "TCM truncated training"}
METRIC_ORDER = ("fid", "fid_heun", "dfid")  # eval cards' metrics, in the order `report` lists them
REPORTED_KINDS = ("grad_spike", "nonfinite", "fp16_skip", "config_change")  # metrics.jsonl rows worth counting


def init_file_now(source: dict) -> str:
    """Whether the file a run started from (its `init_source`) is still there and still that file: 'same file',
    'changed (sha256 ...)', or 'missing'. Hashes the whole file (seconds for a CIFAR-10 checkpoint)."""
    path = Path(source["path"])
    if not path.is_file():
        return "missing"
    now = checkpoint.sha256(path)
    return "same file" if now == source["sha256"] else f"changed (sha256 now {now[:12]}…)"


def describe(run: str | Path, verify_init: bool = False) -> dict:
    """A run directory (or its checkpoint file) as a dict: path, stage, preset, step, steps, changed (fields that
    differ from the preset), tensors, checksummed, init_source (+ 'now' with verify_init), compute, last_train,
    reported (counts of REPORTED_KINDS), eval (the latest score of each eval card at the checkpoint's step)."""
    ckpt = checkpoint_path(run)
    state = checkpoint.load(ckpt)  # a missing, damaged or tampered file raises here, saying what to do
    with safe_open(str(ckpt), framework="pt") as fh:
        checksummed, tensors = checkpoint.SUMS_KEY in (fh.metadata() or {}), len(fh.keys())
    cfg = from_dict(json.loads(state["config"]))
    step = int(state["step"])
    changed = None  # a run of a preset this tcmlab does not have (renamed, removed) has nothing to compare with
    if cfg.name in PRESETS and PRESETS[cfg.name][cfg.stage] is not None:
        changed = config_diff(preset(cfg.name, cfg.stage, init_from=cfg.init_from), cfg)
    source = state.get("init_source")
    if source is not None and verify_init:
        source = {**source, "now": init_file_now(source)}
    rows = read_metrics(ckpt.parent / "metrics.jsonl")
    train_rows = [r for r in rows if r.get("kind") == "train"]
    evals = {}
    for r in read_metrics(ckpt.parent / EVAL_NAME):
        card = r.get("card") if isinstance(r, dict) else None
        if isinstance(card, dict) and card.get("step") == step:
            evals[(card.get("metric"), tuple(card.get("steps", ())))] = r  # the latest row of each card wins
    return {"path": str(ckpt.parent), "checkpoint": str(ckpt), "stage": cfg.stage, "preset": cfg.name, "step": step,
            "steps": cfg.train.steps, "changed": changed, "tensors": tensors, "checksummed": checksummed,
            "init_source": source, "compute": state.get("compute"), "batch": cfg.train.batch,
            "last_train": train_rows[-1] if train_rows else None,
            "reported": dict(Counter(r.get("kind") for r in rows if r.get("kind") in REPORTED_KINDS)),
            "eval": [{"metric": m, "steps": list(s), "score": r.get("fid"), "n": r["card"].get("n"),
                      "extractor": r["card"].get("extractor"), "nonfinite": r.get("nonfinite")}
                     for (m, s), r in sorted(evals.items(), key=_card_order)]}


def _card_order(item) -> tuple:
    (metric, steps), _ = item
    return (METRIC_ORDER.index(metric) if metric in METRIC_ORDER else len(METRIC_ORDER), len(steps),
            [float(s) for s in steps])


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds:.1f} s"


def report(d: dict) -> str:
    """`describe`'s dict as the lines `python -m tcmlab info` prints."""
    done = "finished" if d["step"] >= d["steps"] else f"{d['steps'] - d['step']} steps to go"
    sums = (f"{d['tensors']} tensors, checksums ok" if d["checksummed"] else
            f"{d['tensors']} tensors, no checksums (written by an older tcmlab)")
    lines = [f"{d['path']}: step {d['step']} of {d['steps']} ({done}); {sums}",
             f"  stage {d['stage']} ({STAGE_NAMES[d['stage']]}), preset {d['preset']!r}: "
             + ("not a preset of this tcmlab" if d["changed"] is None else
                "as the preset" if not d["changed"] else f"differs from the preset in {', '.join(d['changed'])}")]
    src = d["init_source"]
    if src is not None:
        lines.append(f"  started from {src['path']} at its step {src['step']} (sha256 {src['sha256'][:12]}…"
                     + (f"; now: {src['now']})" if "now" in src else "; --verify-init compares it with the file now)"))
    c = d["compute"]
    if c is not None:
        since = f", counted from step {c['since_step']}" if c.get("since_step") else ""
        lines.append(f"  compute: {d['step'] * d['batch']:,} images seen, {_hours(c['train_seconds'])} of training, "
                     f"{_hours(c['device_seconds'])} device time{since}")
    else:
        lines.append("  compute: not recorded (a checkpoint of an older tcmlab)")
    t = d["last_train"]
    if t is not None:
        top = f" (largest since the row before: {t['grad_norm_max']:.4g})" if "grad_norm_max" in t else ""
        lines.append(f"  last train row, step {t['step']}: loss {t['loss']:.4g}, gradient norm {t['grad_norm']:.4g}{top}")
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(d["reported"].items()))
    lines.append(f"  metrics.jsonl reports: {counts or 'no spikes, non-finite stops, fp16 skips or config changes'}")
    if d["eval"]:
        named = {"fid": "FID {k}-step ({via})", "fid_heun": "FID Heun ({k} times)"}
        scores = [named.get(e["metric"], e["metric"] + " {via}").format(
            k=len(e["steps"]), via=" → ".join(f"{s:g}" for s in e["steps"])) + f": {e['score']:.4g}"
            for e in d["eval"] if e["metric"] != "dfid"]
        dfid = [f"{e['steps'][0]:g}: {e['score']:.4g}" for e in d["eval"] if e["metric"] == "dfid"]
        scores = "; ".join(scores + ([f"dFID_t at t = {', '.join(dfid)}"] if dfid else []))
        cards = sorted({f"n = {e['n']}, extractor {e['extractor']}" for e in d["eval"]})
        lines.append(f"  eval.jsonl at step {d['step']} ({'; '.join(cards)}): {scores}")
    else:
        lines.append(f"  eval.jsonl: no scores at step {d['step']} (python -m tcmlab evaluate {d['path']})")
    return "\n".join(lines)
