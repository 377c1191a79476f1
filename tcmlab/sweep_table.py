"""A sweep's results table, rows of dicts: summary over seeds, CSV, plotly figures and a markdown table.

Pure functions of the rows (as `tcmlab.sweep.results_table` builds them, or read back from results.csv).
"""

from __future__ import annotations

import csv
import io
import itertools
import statistics
from pathlib import Path
from typing import Any


def _number(v) -> float | None:
    return None if v in (None, "") else float(v)


def summarize(table: list[dict]) -> list[dict]:
    """Group the table's rows by grid point (every column except point, seed, value, value_sd, kid_std, nonfinite,
    floor, floor_n, card) and give mean, std (sample standard deviation over seeds; None for one seed), count, the
    mean floor and draw_sd, the mean over seeds of the spread over noise draws (None where each score is one draw).
    Works on `results_table` rows and on rows read back from results.csv (strings). Non-finite sample counts are
    not summarised here: they are per run, in results.csv."""
    skip = {"point", "seed", "value", "value_sd", "kid_std", "nonfinite", "floor", "floor_n", "card"}
    groups: dict[tuple, list[dict]] = {}
    for row in table:
        groups.setdefault(tuple((c, row[c]) for c in row if c not in skip), []).append(row)
    out = []
    for key, rows in groups.items():
        vals = [_number(r["value"]) for r in rows]
        floors = [f for f in (_number(r.get("floor")) for r in rows) if f is not None]
        sds = [v for v in (_number(r.get("value_sd")) for r in rows) if v is not None]
        out.append({**dict(key), "mean": statistics.fmean(vals),
                    "std": statistics.stdev(vals) if len(vals) > 1 else None, "count": len(vals),
                    "floor": statistics.fmean(floors) if floors else None,
                    "draw_sd": statistics.fmean(sds) if sds else None})
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    """rows as CSV (None -> empty cell), written atomically."""
    from .checkpoint import atomic_write_text

    buf = io.StringIO()
    columns = list(dict.fromkeys(c for r in rows for c in r))
    w = csv.DictWriter(buf, columns, lineterminator="\n")
    w.writeheader()
    w.writerows({c: ("" if r.get(c) is None else r.get(c)) for c in columns} for r in rows)
    atomic_write_text(path, buf.getvalue())


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _label(row: dict) -> str:
    values = [f"{c.rpartition('.')[2]}={row[c]}" for c in row if c[:2] in ("s0", "s1", "s2") and "." in c
              and row[c] not in (None, "")]
    return " ".join([row["kind"], *values])


def summary_figures(summary: list[dict]) -> dict[str, Any]:
    """Two plotly figures of the summary (mean ± std over seeds): 'fid', 1- and 2-step FID per point (and a stage-0
    point's Heun FID) with the real-vs-real floor, and 'dfid', the dFID_t curves."""
    import plotly.graph_objects as go

    fid = go.Figure()
    names = {"fid_1step": "1-step FID", "fid_2step": "2-step FID (T → t_mid; stage 2: T → max(t_mid, t′))",
             "fid_heun": "Heun FID (stage 0: EDM's sampler)"}
    for metric, name in names.items():
        rows = [r for r in summary if r["metric"] == metric]
        if not rows:
            continue
        fid.add_scatter(x=[_label(r) for r in rows], y=[r["mean"] for r in rows], mode="markers", name=name,
                        error_y=dict(array=[r["std"] or 0 for r in rows]))
    dfid = go.Figure()
    for label, rows in itertools.groupby(sorted((r for r in summary if r["metric"] == "dfid"), key=_label), _label):
        rows = sorted(rows, key=lambda r: float(r["t"]))
        dfid.add_scatter(x=[float(r["t"]) for r in rows], y=[r["mean"] for r in rows], name=label,
                         error_y=dict(array=[r["std"] or 0 for r in rows]))
    floors = [r["floor"] for r in summary
              if r["metric"] in ("fid_1step", "fid_heun", "dfid") and r["floor"] is not None]
    if floors:  # a dotted line (a trace, not add_hline, whose annotation breaks log axes)
        for fig in (fid, dfid):
            x = [d for tr in fig.data for d in tr.x]
            if not x:
                continue
            x = [x[0], x[-1]] if fig is fid else [min(x), max(x)]
            fig.add_scatter(x=x, y=[statistics.fmean(floors)] * 2, mode="lines", line_dash="dot",
                            name="real-vs-real floor")
    fid.update_layout(title="FID (mean ± std over seeds)", yaxis_type="log", height=450,
                      xaxis_title="sweep point (kind and grid values)", yaxis_title="FID (log scale)")
    dfid.update_layout(title="dFID_t (mean ± std over seeds)", xaxis_type="log", yaxis_type="log", height=450,
                       xaxis_title="noise level t (log scale)", yaxis_title="dFID_t (log scale)")
    return {"fid": fid, "dfid": dfid}


def curve_figures(curves: list[dict]) -> dict[str, Any]:
    """One figure per sweep point from the summarized curves (`summarize(curves_table(...))`): dFID_t at each t and
    1-step FID against training step, mean ± std over seeds, log y (TCM Fig. 2 for stage 1, Fig. 3 for stage 2).
    Named 'training_<kind and grid values>'."""
    import plotly.graph_objects as go

    out = {}
    for label, rows in itertools.groupby(sorted(curves, key=_label), _label):
        rows = list(rows)
        fig = go.Figure()
        lines = sorted({(r["metric"], None if r["t"] in (None, "") else float(r["t"])) for r in rows},
                       key=lambda m: (m[0] != "fid_1step", m[1] or 0))
        for metric, t in lines:
            pts = sorted((r for r in rows if r["metric"] == metric
                          and (t is None or float(r["t"]) == t)), key=lambda r: int(r["step"]))
            fig.add_scatter(x=[int(r["step"]) for r in pts], y=[float(r["mean"]) for r in pts], mode="lines+markers",
                            name="1-step FID" if t is None else f"dFID at t={t:g}",
                            line_dash="dash" if t is None else None,
                            error_y=dict(array=[float(r["std"] or 0) for r in pts]))
        floors = [float(r["floor"]) for r in rows if r.get("floor") not in (None, "")]
        if floors:
            steps = [int(r["step"]) for r in rows]
            fig.add_scatter(x=[min(steps), max(steps)], y=[statistics.fmean(floors)] * 2, mode="lines",
                            line_dash="dot", name="real-vs-real floor")
        seeds = max(int(r["count"]) for r in rows)
        fig.update_layout(title=f"during training: {label} (mean ± std over {seeds} seed(s))", yaxis_type="log",
                          height=450, xaxis_title="training step (of this run; a control continues stage 1)",
                          yaxis_title="FID (log scale)")
        out["training_" + "".join(ch if ch.isalnum() or ch in "=._-" else "_" for ch in label)] = fig
    return out


def figures(summary: list[dict], folder: Path, png: bool = True, curves: list[dict] = ()
            ) -> tuple[list[Path], str | None]:
    """`summary_figures` (and `curve_figures` of summarized curves) written as .json and .html always, as .png when
    asked and kaleido can render (else the reason is returned)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, png_note = [], None if png else "PNG figures not asked for"
    for name, fig in {**summary_figures(summary), **(curve_figures(list(curves)) if curves else {})}.items():
        fig.write_json(folder / f"{name}.json")
        fig.write_html(folder / f"{name}.html", include_plotlyjs="directory")
        paths += [folder / f"{name}.json", folder / f"{name}.html"]
        if png_note is None:
            try:
                fig.write_image(folder / f"{name}.png")
                paths.append(folder / f"{name}.png")
            except Exception as e:  # kaleido needs a Chromium; without one the PNGs are skipped, not the sweep
                png_note = f"PNG figures skipped: kaleido could not render ({type(e).__name__}: {str(e)[:200]})"
    return paths, png_note


def _cell(v) -> str:
    """A markdown table cell of a number (4 significant digits), empty for a missing one."""
    return "" if _number(v) is None else f"{_number(v):.4g}"


def summary_markdown(summary: list[dict], metrics=("fid_1step", "fid_2step", "kid_1step", "fid_heun")) -> str:
    """The summary's sample-quality rows as a markdown table: point, metric, mean ± std over seeds (count), floor;
    where scores are means over noise draws, also one draw's spread (`draw_sd`)."""
    rows = sorted((r for r in summary if r["metric"] in metrics), key=lambda r: (r["metric"], _label(r)))
    drawn = any(r.get("draw_sd") not in (None, "") for r in rows)
    lines = ["| point | metric | mean ± std | seeds | " + ("sd of one noise draw | " if drawn else "")
             + "real-vs-real floor |", "|---|---|---|---|" + ("---|" if drawn else "") + "---|"]
    for r in rows:
        std = "" if r["std"] in (None, "") else f" ± {float(r['std']):.4g}"
        sd = f"{_cell(r.get('draw_sd'))} | " if drawn else ""
        lines.append(f"| {_label(r)} | {r['metric']} | {float(r['mean']):.4g}{std} | {r['count']} | {sd}"
                     f"{_cell(r['floor'])} |")
    return "\n".join(lines)
