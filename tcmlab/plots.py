"""plotly figures for the notebooks: every number comes from tcmlab functions; notebooks only call these.

Live plots use `go.FigureWidget` (anywidget) while a frontend is attached; `show(fig)` then emits the static plotly
JSON so a notebook executed headlessly by papermill still shows its figures when opened later.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch

from . import rundir
from .config import RunConfig, from_dict
from .precond import T_MAX
from .schedules import LogNormal, TruncatedLogStudentT, delta_t, ect_ratio, n_boundary


def show(fig) -> None:
    """Display a (possibly live) figure as static plotly JSON, viewable later without re-running."""
    go.Figure(fig).show(renderer="plotly_mimetype")


def mark_x(fig, x: float, text: str, log: bool) -> None:
    """A dotted vertical line at x with a label on top. plotly places annotations on a log axis by log10 of the
    position (shapes by the value itself), so the label is given log10(x) there."""
    fig.add_vline(x=x, line_dash="dot")
    fig.add_annotation(x=math.log10(x) if log else x, y=1, yref="paper", text=text, showarrow=False, yanchor="bottom")


def _log_x(fig, title):
    fig.update_layout(title=title, xaxis_type="log", height=350, margin=dict(l=40, r=20, t=50, b=40))
    return fig


def t_histogram(dist, n: int = 20_000, seed: int = 0, name: str = "sampled t") -> go.Figure:
    t = dist.sample(n, torch.Generator().manual_seed(seed)).numpy()
    bins = np.geomspace(t.min(), t.max(), 60)
    counts, edges = np.histogram(t, bins)
    fig = go.Figure(go.Bar(x=np.sqrt(edges[1:] * edges[:-1]), y=counts / n, name=name))
    return _log_x(fig, f"{type(dist).__name__}: share of t per log-bin")


def curriculum(q: float, d: int, ratio_max: float, steps: int, ts=(0.01, 0.1, 1.0, 10.0)) -> go.Figure:
    """ECT ratio(i) (TCM App. E) and Δt(t) at a few t over training."""
    i = np.unique(np.linspace(0, steps, 200).astype(int))
    ratio = [ect_ratio(int(k), q, d, ratio_max) for k in i]
    fig = go.Figure(go.Scatter(x=i, y=ratio, name="ratio(i)", yaxis="y"))
    for t in ts:
        fig.add_scatter(x=i, y=[float(delta_t(torch.tensor(t), r)) for r in ratio], name=f"Δt at t={t:g}", yaxis="y2")
    fig.update_layout(title="ECT curriculum", yaxis=dict(title="ratio"), height=350,
                      yaxis2=dict(title="Δt", overlaying="y", side="right", type="log"))
    return fig


def run_config(run: str | Path) -> RunConfig:
    """The RunConfig a run directory was trained with (its config.json)."""
    return from_dict(json.loads((Path(run) / "config.json").read_text()))


def read_metrics(run: str | Path, kind: str = "train") -> list[dict]:
    """The rows of one kind of a run's metrics.jsonl (read as training reads it: a torn last line is dropped)."""
    return [r for r in rundir.read_metrics(Path(run) / "metrics.jsonl") if r.get("kind") == kind]


def loss_by_t(run: str | Path) -> go.Figure:
    """Per-sample loss by t-bin over training (minRF's diagnostic): one line per log-t bin."""
    from .train import loss_t_edges
    edges = loss_t_edges(run_config(run).t_max)
    rows = read_metrics(run)
    fig = go.Figure()
    for b in range(len(edges) - 1):
        ys = [r["loss_by_t"][b] for r in rows]
        if any(y is not None for y in ys):
            fig.add_scatter(x=[r["step"] for r in rows], y=ys, name=f"t∈[{edges[b]:.3g},{edges[b+1]:.3g})")
    fig.update_layout(title="loss by t", yaxis_type="log", height=350)
    return fig


class LiveDFID:
    """dFID_t over training, one line per t (TCM Fig. 2/3 style); pass `.on_log` to `train(..., on_log=...)`."""

    def __init__(self, title: str = "dFID_t during training", t_prime: float | None = None, live: bool = True):
        try:
            self.fig = go.FigureWidget() if live else go.Figure()
        except ImportError:  # no anywidget: static figure, still shown at the end
            self.fig = go.Figure()
        self.fig.update_layout(title=title + ("" if t_prime is None else f" (t′ = {t_prime:g}: dashed below)"),
                               yaxis_type="log", xaxis_title="step", yaxis_title="dFID", height=380)
        self.t_prime = t_prime

    def on_log(self, row: dict) -> None:
        if row.get("kind") != "eval":
            return
        points = {f"t={float(t):g}": (v, float(t)) for t, v in row["dfid"].items()}
        if row.get("floor") is not None:  # the real-vs-real FD at the n of these scores (metrics.floor)
            points[f"real-vs-real floor (n={row['n']})"] = (row["floor"], None)
        names = [tr.name for tr in self.fig.data]
        for name, (v, t) in points.items():
            if name not in names:
                if t is None:
                    style = dict(mode="lines", line=dict(dash="dot", color="black"))
                else:
                    dash = "dash" if self.t_prime is not None and t < self.t_prime else None
                    style = dict(mode="lines+markers", line=dict(dash=dash))
                self.fig.add_scatter(x=[], y=[], name=name, **style)
                names.append(name)
            tr = self.fig.data[names.index(name)]
            tr.x = tuple(tr.x or ()) + (row["step"],)
            tr.y = tuple(tr.y or ()) + (v,)


def dfid_over_training(run: str | Path, t_prime: float | None = None) -> go.Figure:
    """The dFID_t-over-training figure rebuilt from a run's metrics.jsonl (static; also after a resumed run), with
    the real-vs-real floor at the scores' n where the eval rows carry one."""
    plot = LiveDFID(f"dFID_t during training: {Path(run).name}", t_prime=t_prime, live=False)
    for row in read_metrics(run, "eval"):
        plot.on_log(row)
    return plot.fig


def dfid_curves(runs: dict[str, str | Path], t_prime: float | None = None) -> go.Figure:
    """Final dFID_t against t for several runs (from their last eval rows), with t′ marked."""
    fig = go.Figure()
    for label, run in runs.items():
        ev = read_metrics(run, "eval")
        if ev:
            d = ev[-1]["dfid"]
            fig.add_scatter(x=[float(t) for t in d], y=list(d.values()), name=label, mode="lines+markers")
    if t_prime is not None:
        mark_x(fig, t_prime, "t′", log=True)
    fig.update_layout(yaxis_type="log")
    return _log_x(fig, "dFID_t across t")


def boundary_mass(w_b: float) -> float:
    """λ_b, the Dirac mass of ψ_t at t′ (TCM Eq. 7), from the boundary weight: Eq. (10) weights L_B by
    w_b = λ_b/(1 − λ_b), so λ_b = w_b/(1 + w_b) (docs/decisions.md §6). ρ is not a mass: it is the share of each batch
    spent estimating L_B."""
    return w_b / (1 + w_b)


def psi_figure(t_prime: float, scale: float, nu: float, rho: float, w_b: float = 0.1, ratio: float = 0.999,
               lognormal: LogNormal = LogNormal(), t_max: float = T_MAX, fig=None):
    """TCM Eq. (7) / Fig. 4a: ψ_t = λ_b·δ(t − t′) + (1 − λ_b)·ψ̄_t with λ_b = w_b/(1 + w_b), beside stage 1's
    log-normal; ρ (the batch share at t′) is shown in the legend, not as a mass."""
    psi = TruncatedLogStudentT(t_prime, t_max, scale, nu)
    lam = boundary_mass(w_b)
    t = np.geomspace(0.002, t_max, 600)
    fig = fig if fig is not None else go.Figure()
    dens_t = t * psi.pdf(t) * (1 - lam)  # density per unit ln t
    traces = [go.Scatter(x=t, y=t * lognormal.pdf(t), name="stage 1: log-normal"),
              go.Scatter(x=t, y=dens_t, name="stage 2: (1−λ_b)·ψ̄_t"),
              go.Scatter(x=[t_prime, t_prime], y=[0, lam], mode="lines", line=dict(width=4),
                         name=f"λ_b·δ(t−t′): mass λ_b = w_b/(1+w_b) = {lam:.3f}<br>"
                              f"(ρ = {rho:g}: {n_boundary(1000, rho) / 10:g}% of each batch at t′)")]
    dt = float(delta_t(torch.tensor(t_prime), ratio))
    title = (f"ψ_t (TCM Eq. 7): t′={t_prime:g}, scale={scale:g}, ν={nu:g}, w_b={w_b:g}<br>"
             f"Δt at t′ = {dt:.2e} · median ψ̄ = {float(psi.quantile(0.5)):.3g}")
    with fig.batch_update() if isinstance(fig, go.FigureWidget) else contextlib.nullcontext():
        if len(fig.data) == 3:
            for old, new in zip(fig.data, traces):
                old.x, old.y, old.name = new.x, new.y, new.name
        else:
            for tr in traces:
                fig.add_trace(tr)
        fig.update_layout(title=title, xaxis_type="log", xaxis_title="noise level t", height=420,
                          yaxis_title="density per ln t (spike: its mass λ_b)", margin=dict(t=90))
    return fig

