"""Figures of the claims report (`python -m tcmlab claims SPEC --figures DIR`): plotly figures of a sweep's tables
(`tcmlab.claims.Tables`), mean ± std over seeds, titled axes, the real-vs-real floor where it applies."""

from __future__ import annotations

import statistics

from .claims import Tables, psi_label, psi_shapes


def _ms(values) -> tuple[float | None, float]:
    values = list(values)
    if not values:
        return None, 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _floor_line(fig, tb: Tables, x0, x1) -> None:
    n, fl = tb.floor()
    if fl is not None:
        fig.add_scatter(x=[x0, x1], y=[fl, fl], mode="lines", line_dash="dot", line_color="gray",
                        name=f"real-vs-real floor (n = {n})")


def tprime(tb: Tables, values: list[float]):
    """1- and 2-step FID against t′ (TCM Table 3), with stage 1 and the control as horizontal lines."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for metric, name in (("fid_1step", "stage 2, 1-step"), ("fid_2step", "stage 2, 2-step (via max(t_mid, t′))")):
        pts = [(v, *_ms(tb.final(metric, "stage2", t_prime=v).values())) for v in values]
        pts = [p for p in pts if p[1] is not None]
        fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], error_y=dict(array=[p[2] for p in pts]),
                        mode="lines+markers", name=name)
    lo, hi = min(values), max(values)
    for kind, dash in (("stage1", "dash"), ("control", "dashdot")):
        m, _ = _ms(tb.final("fid_1step", kind).values())
        if m is not None:
            fig.add_scatter(x=[lo, hi], y=[m, m], mode="lines", line_dash=dash, name=f"{kind}, 1-step")
    _floor_line(fig, tb, lo, hi)
    fig.update_layout(title="FID against the dividing time t′ (TCM Table 3; mean ± std over seeds)", height=420,
                      width=900, xaxis=dict(title="dividing time t′ (log scale)", type="log", tickvals=values,
                                            ticktext=[f"{v:g}" for v in values]), yaxis_title="FID")
    return fig


def dfid_profile(tb: Tables, t_prime: float):
    """dFID_t against t at the end of stage 1, of the control and of stage 2 (the trade-off of TCM Fig. 3)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    ts = tb.ts("stage1")
    for kind, name in (("stage1", "stage 1"), ("control", "control (stage 1 continued)"),
                       ("stage2", f"stage 2 (t′ = {t_prime:g})")):
        pts = [(t, *_ms(tb.final("dfid", kind, t).values())) for t in ts]
        pts = [p for p in pts if p[1] is not None]
        fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], error_y=dict(array=[p[2] for p in pts]),
                        mode="lines+markers", name=name)
    _floor_line(fig, tb, min(ts), max(ts))
    fig.add_vline(x=t_prime, line_dash="dash", line_color="gray")
    fig.update_layout(title="dFID_t at the end of each run (mean ± std over seeds; dashed: t′)", height=420,
                      width=900,
                      xaxis_title="noise level t (log scale)", xaxis_type="log", yaxis_title="dFID_t (log scale)",
                      yaxis_type="log")
    return fig


def over_training(tb: Tables, kind: str, title: str, start: str | None = None):
    """dFID_t at each t and the 1-step FID against the training step of one point (mean over seeds; TCM Fig. 2 for
    stage 1, Fig. 3 for stage 2). start: a kind whose last evaluation during training is drawn at step 0 (stage 2
    starts from stage 1's end; the same one-draw estimator as the curve, not the final score's mean over draws)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    ts = sorted({float(r["t"]) for r in tb.where(tb.curves, kind) if r["metric"] == "dfid"})
    steps = []
    for metric, t in [("fid_1step", None)] + [("dfid", t) for t in ts]:
        per_seed = tb.curve(metric, kind, t)
        grid = sorted(set.intersection(*(set(c) for c in per_seed.values()))) if per_seed else []
        ys = [statistics.fmean(c[s] for c in per_seed.values()) for s in grid]
        name = "1-step FID" if t is None else f"dFID at t={t:g}"
        if start is not None and grid:  # over the seeds of the curve: stage 1's last curve point, else its final score
            ends = {s: c[max(c)] for s, c in tb.curve(metric, start, t).items() if c and s in per_seed}
            if len(ends) < len(per_seed):
                ends, name = tb.final(metric, start, t), name + " (step 0: stage 1's final score)"
                ends = {s: v for s, v in ends.items() if s in per_seed}
            if len(ends) == len(per_seed):
                grid, ys = [0] + grid, [statistics.fmean(ends.values())] + ys
        steps += grid
        fig.add_scatter(x=grid, y=ys, mode="lines+markers", name=name, line_dash="dash" if t is None else None)
    if steps:
        _floor_line(fig, tb, min(steps), max(steps))
    fig.update_layout(title=title, height=450, width=900, xaxis_title="training step of this stage",
                      yaxis_title="FID (log scale)", yaxis_type="log")
    return fig


def ablations(tb: Tables, settings: list[tuple[str, dict]]):
    """1-step FID (mean ± std) of stage 1, the control and each stage-2 setting (label, changed fields); None
    where none of them has a row."""
    import plotly.graph_objects as go

    bars = [("stage 1", _ms(tb.final("fid_1step", "stage1").values())),
            ("control", _ms(tb.final("fid_1step", "control").values()))]
    bars += [(label, _ms(tb.final("fid_1step", "stage2", **changed).values())) for label, changed in settings]
    bars = [(label, m, s) for label, (m, s) in bars if m is not None]
    if not bars:
        return None
    fig = go.Figure(go.Scatter(x=[b[0] for b in bars], y=[b[1] for b in bars], mode="markers", marker_size=10,
                               error_y=dict(array=[b[2] for b in bars]), name="1-step FID"))
    _floor_line(fig, tb, bars[0][0], bars[-1][0])
    fig.update_layout(title="1-step FID per run: stage 2 with one change from the defaults (mean ± std)",
                      height=460, width=900, xaxis_title="run (stage 2: the field changed from the defaults)",
                      yaxis_title="1-step FID")
    return fig


def all_figures(tb: Tables, values: dict[str, list]) -> tuple[dict, dict[str, str]]:
    """The report's figures by file name, and those not drawn (name → why): a figure needs rows to plot (a sweep
    without `[eval] every` has no curves, one evaluated without dFID no profile), never an empty frame."""
    ref = {c.rpartition(".")[2]: v for c, v in tb.default.items()}
    t_prime = tb.t_prime  # the stage-2 default's, also where no grid varies t′
    out, skipped = {}, {}
    if tb.ts("stage1"):
        out["dfid_profile"] = dfid_profile(tb, t_prime)
    else:
        skipped["dfid_profile"] = "no final dFID_t rows of stage 1 in results.csv"
    titles = {"stage1": "During stage 1 (TCM Fig. 2; mean over seeds)",
              "stage2": f"During stage 2, t′ = {t_prime:g}, from the end of stage 1 (TCM Fig. 3; mean over seeds)"}
    for kind, title in titles.items():
        if not tb.curves:
            skipped[f"{kind}_training"] = "no curves.csv rows (the spec sets no [eval] every)"
        elif not tb.where(tb.curves, kind):
            skipped[f"{kind}_training"] = f"no {kind} rows in curves.csv"
        else:
            out[f"{kind}_training"] = over_training(tb, kind, title, start="stage1" if kind == "stage2" else None)
    t_primes = [float(v) for v in values.get("t_prime", [])]
    if len(t_primes) > 1 and any(tb.final("fid_1step", "stage2", t_prime=v) for v in t_primes):
        out["tprime"] = tprime(tb, t_primes)
    elif len(t_primes) > 1:
        skipped["tprime"] = "no stage-2 1-step FID rows at the grid's t′ values"
    settings = [(f"{name} = {v}", {name: v}) for name in ("t_prime", "w_b", "rho", "teacher_dropout")
                for v in values.get(name, []) if str(v) != str(ref.get(name))]
    settings += [(psi_label(sh), sh) for sh in psi_shapes(tb) if any(float(v) != float(ref[c]) for c, v in sh.items())]
    fig = ablations(tb, [("defaults", {})] + settings)
    if fig is None:
        skipped["ablations"] = "no 1-step FID rows of stage 1, the control or stage 2"
    else:
        out["ablations"] = fig
    return out, skipped
