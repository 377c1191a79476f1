"""plotly figures for the notebooks: every number comes from tcmlab functions; notebooks only call these.

Every figure has titled axes. Figures reach the notebook through `tcmlab.display` (`show`, `LiveFigure`): plotly JSON
plus a PNG copy, so a notebook executed headlessly by papermill still shows its figures when opened later.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from . import rundir
from .config import RunConfig, from_dict
from .display import LiveFigure, show  # noqa: F401  (notebooks call plots.show)
from .health import SPIKE_FACTOR
from .precond import T_MAX
from .schedules import LogNormal, TruncatedLogStudentT, delta_t, ect_ratio, n_boundary
from .viz import to_uint8

def mark_x(fig, x: float, text: str, log: bool) -> None:
    """A dotted vertical line at x with a label on top. plotly places annotations on a log axis by log10 of the
    position (shapes by the value itself), so the label is given log10(x) there."""
    fig.add_vline(x=x, line_dash="dot")
    fig.add_annotation(x=math.log10(x) if log else x, y=1, yref="paper", text=text, showarrow=False, yanchor="bottom")


T_AXIS = "noise level t (log scale)"


def _log_x(fig, title, x_title=T_AXIS, y_title=None):
    fig.update_layout(title=title, xaxis_type="log", xaxis_title=x_title, yaxis_title=y_title, height=380,
                      margin=dict(l=60, r=20, t=60, b=50))
    return fig


def t_histogram(dist, n: int = 20_000, seed: int = 0, name: str = "sampled t") -> go.Figure:
    """A histogram of n draws of t on 60 log-spaced bins; each bar spans its bin (on a log axis a bar's width is
    in data units, so a fixed width would shrink to a hairline at large t)."""
    t = dist.sample(n, torch.Generator().manual_seed(seed)).numpy()
    bins = np.geomspace(t.min(), t.max(), 60)
    counts, edges = np.histogram(t, bins)
    fig = go.Figure(go.Bar(x=(edges[1:] + edges[:-1]) / 2, width=np.diff(edges), y=counts / n, name=name,
                           marker_line_width=0))
    return _log_x(fig, f"{type(dist).__name__}: share of t per log-bin", y_title="share of samples in the bin")


def curriculum(q: float, d: int, ratio_max: float, steps: int, ts=(0.01, 0.1, 1.0, 10.0),
               step_offset: int = 0) -> go.Figure:
    """ECT ratio(i) (TCM App. E) and Δt(t) at a few t over training: i from `step_offset` (`train.step_offset`, the
    curriculum's iteration at step 0) to step_offset + steps."""
    i = np.unique(np.linspace(step_offset, step_offset + steps, 200).astype(int))
    ratio = [ect_ratio(int(k), q, d, ratio_max) for k in i]
    fig = go.Figure(go.Scatter(x=i, y=ratio, name="ratio(i)", yaxis="y"))
    for t in ts:
        fig.add_scatter(x=i, y=[float(delta_t(torch.tensor(t), r)) for r in ratio], name=f"Δt at t={t:g}", yaxis="y2")
    fig.update_layout(title="ECT curriculum: ratio(i) (left) and Δt at a few t (right)", height=400,
                      xaxis_title="training iteration i", yaxis=dict(title="ratio(i)  (Δt ∝ 1 − ratio)"),
                      yaxis2=dict(title="Δt (log scale)", overlaying="y", side="right", type="log", dtick=1,
                                  exponentformat="power", automargin=True),
                      legend=dict(orientation="h", yanchor="top", y=-0.2, x=0), margin=dict(l=60, r=90, t=60, b=90))
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
    fig.update_layout(title="per-sample loss by t-bin over training", yaxis_type="log", height=380,
                      xaxis_title="training step", yaxis_title="mean per-sample loss (log scale)")
    return fig


def training_curves(run: str | Path) -> go.Figure:
    """Loss and gradient norm (before clipping or scaling) over training, from a run's metrics.jsonl: the norm at each
    logged step, the largest since the previous row (`grad_norm_max`), and the steps logged as spikes (`health`)."""
    rows = read_metrics(run)
    steps = [r["step"] for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("training loss", "gradient norm"))
    fig.add_scatter(x=steps, y=[r["loss"] for r in rows], name="loss", row=1, col=1)
    fig.add_scatter(x=steps, y=[r["grad_norm"] for r in rows], name="grad norm", row=1, col=2)
    with_max = [r for r in rows if "grad_norm_max" in r]  # rows of an older tcmlab have none
    if with_max:
        fig.add_scatter(x=[r["step"] for r in with_max], y=[r["grad_norm_max"] for r in with_max], row=1, col=2,
                        name="largest since the previous row", line=dict(dash="dot"))
    spikes = read_metrics(run, "grad_spike")
    if spikes:
        fig.add_scatter(x=[r["step"] for r in spikes], y=[r["grad_norm"] for r in spikes], mode="markers", row=1,
                        col=2, name=f"spike (> {SPIKE_FACTOR:g}× the recent median)", marker=dict(symbol="x", size=9))
    fig.update_xaxes(title_text="training step")
    fig.update_yaxes(type="log")
    fig.update_yaxes(title_text="loss (log scale)", row=1, col=1)
    fig.update_yaxes(title_text="‖∇θ loss‖ (log scale)", row=1, col=2)
    fig.update_layout(title=f"loss and gradient norm: {Path(run).name}", height=360, showlegend=bool(with_max))
    return fig


class LiveDFID:
    """dFID_t over training, one line per t (TCM Fig. 2/3 style); pass `.on_log` to `train(..., on_log=...)`.

    With `live=True` (in a notebook) the figure is displayed at once and redrawn after every eval row; use it as a
    context manager (or call `finish()`) so that the final state gets its PNG copy."""

    def __init__(self, title: str = "dFID_t during training", t_prime: float | None = None, live: bool = True):
        self.fig = go.Figure()
        self.fig.update_layout(title=title + ("" if t_prime is None else f" (t′ = {t_prime:g}: dashed below)"),
                               yaxis_type="log", xaxis_title="training step", yaxis_title="dFID_t (log scale)",
                               height=400)
        self.t_prime = t_prime
        self.view = LiveFigure(self.fig) if live else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finish()

    def finish(self) -> None:
        if self.view is not None:
            self.view.finish()

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
        if self.view is not None:
            self.view.refresh()


def dfid_over_training(run: str | Path, t_prime: float | None = None) -> go.Figure:
    """The dFID_t-over-training figure rebuilt from a run's metrics.jsonl (static; also after a resumed run), with
    the real-vs-real floor at the scores' n where the eval rows carry one."""
    plot = LiveDFID(f"dFID_t during training: {Path(run).name}", t_prime=t_prime, live=False)
    for row in read_metrics(run, "eval"):
        plot.on_log(row)
    return plot.fig


def dfid_curves(runs: dict[str, str | Path], t_prime: float | None = None) -> go.Figure:
    """Final dFID_t against t for several runs (from their last eval rows), with t′ marked: `t_prime`, or where it is
    None the t′ of each stage-2 run among them (their config.json; named in the legend); a run without eval rows is
    named in the title instead of silently missing."""
    fig = go.Figure()
    missing, own = [], set()
    for label, run in runs.items():
        ev = read_metrics(run, "eval")
        try:  # a run without a readable config.json gets no t′ line
            cfg = run_config(run)
        except (OSError, ValueError, KeyError, TypeError):
            cfg = None
        tp = cfg.loss.t_prime if cfg is not None and cfg.stage == 2 else None
        if ev:
            d = ev[-1]["dfid"]
            fig.add_scatter(x=[float(t) for t in d], y=list(d.values()), mode="lines+markers",
                            name=f"{label} (step {ev[-1]['step']}, n={ev[-1].get('n', '?')}"
                                 + (f", t′={tp:g})" if tp is not None and t_prime is None else ")"))
            own |= {tp} - {None}
        else:
            missing.append(label)
    for tp in sorted(own) if t_prime is None else [t_prime]:
        mark_x(fig, tp, "t′" if t_prime is not None or len(own) == 1 else f"t′={tp:g}", log=True)
    fig.update_layout(yaxis_type="log", showlegend=True)
    title = "dFID_t across t (last evaluation of each run)"
    if missing:
        title += f"<br>no dFID rows in: {', '.join(missing)}"
    return _log_x(fig, title, y_title="dFID_t (log scale)")


def _picture(x: torch.Tensor) -> go.Image | go.Scatter:
    """One panel: an image grid for [N, C, H, W] in [−1, 1] (grey images as RGB), a scatter for [N, 2] points."""
    if x.ndim == 2:
        p = x.detach().float().cpu().numpy()
        return go.Scatter(x=p[:, 0], y=p[:, 1], mode="markers", marker=dict(size=3), showlegend=False)
    from torchvision.utils import make_grid
    grid = make_grid(to_uint8(x), nrow=int(math.ceil(math.sqrt(len(x)))), padding=1, pad_value=255)
    return go.Image(z=grid.permute(1, 2, 0).numpy())


def picture_panels(rows: dict[str, dict[str, torch.Tensor]], title: str, height_per_row: int = 260) -> go.Figure:
    """A grid of sample pictures: rows[row_label][col_label] = images [N, C, H, W] or 2-D points [N, 2]. Column
    labels head the top row; each row's label is its first panel's y-axis title; the figure widens with the columns
    (its PNG copy too)."""
    row_labels = list(rows)
    col_labels = list(next(iter(rows.values())))
    fig = make_subplots(rows=len(row_labels), cols=len(col_labels), horizontal_spacing=0.02, vertical_spacing=0.06,
                        column_titles=col_labels)
    for i, r in enumerate(row_labels, 1):
        for j, c in enumerate(col_labels, 1):
            fig.add_trace(_picture(rows[r][c]), row=i, col=j)
        fig.update_yaxes(title_text=r, row=i, col=1)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    title_px = 90  # room for the title and the column titles
    fig.update_layout(title=title, height=title_px + height_per_row * len(row_labels),
                      width=max(820, 160 * len(col_labels) + 200), margin=dict(l=120, r=20, t=title_px, b=20))
    return fig


@torch.no_grad()
def sample_panels(models: dict, t_mid: float, n: int = 64, seed: int = 0) -> go.Figure:
    """1-step (T) and 2-step (T → t_mid) samples of each `TrainedModel` from the same noise (same seed), side by side."""
    from .samplers import one_and_two_step
    rows = {"1 step": {}, f"2 steps (T → {t_mid:g})": {}}
    for label, m in models.items():
        for row, x in zip(rows, one_and_two_step(m, n, t_mid, seed).values()):
            rows[row][label] = x
    return picture_panels(rows, f"samples from the same noise (seed {seed}), EMA weights")


@torch.no_grad()
def denoise_strip(models: dict, x: torch.Tensor, ts=(0.1, 0.5, 1.0, 2.0, 5.0, 20.0), seed: int = 0) -> go.Figure:
    """What dFID_t scores (TCM §2.2): real x noised to x + tε (top row, rescaled by 1/√(1+t²) to the data's range) and
    each `TrainedModel`'s one-step denoising f(x + tε, t) of the same noisy inputs (one row per model), at a few t.
    x: real data in the model's range, [N, C, H, W] images or [N, 2] points. Levels above the models' T are left out
    (the models were never trained there; the digits' T is 10)."""
    from .metrics import denoise
    t_max = min((m.t_max for m in models.values()), default=math.inf)
    ts = [t for t in ts if t <= t_max]
    rows = {"(x + tε)/√(1+t²)": {}}
    for t in ts:
        eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        rows["(x + tε)/√(1+t²)"][f"t={t:g}"] = (x + t * eps) / math.sqrt(1 + t * t)
    for label, m in models.items():
        # metrics.denoise draws ε the same way from the same seed: the same noisy inputs as the top row
        rows[f"{label} (step {m.step}): f(x + tε, t)"] = {
            f"t={t:g}": denoise(m.f, x, t, torch.Generator().manual_seed(seed)) for t in ts}
    return picture_panels(rows, "one-step denoising of real data (what dFID_t scores)", height_per_row=200)


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
    # t′ and the float just below it on the grid: ψ̄ jumps from 0 to its peak there (no ramp drawn below t′)
    t = np.unique(np.concatenate([np.geomspace(0.002, t_max, 600), [np.nextafter(t_prime, 0), t_prime]]))
    fig = fig if fig is not None else go.Figure()
    dens_t = t * psi.pdf(t) * (1 - lam)  # density per unit ln t
    traces = [go.Scatter(x=t, y=t * lognormal.pdf(t), name="stage 1: log-normal"),
              go.Scatter(x=t, y=dens_t, name="stage 2: (1−λ_b)·ψ̄_t"),
              go.Scatter(x=[t_prime, t_prime], y=[0, lam], mode="lines", line=dict(width=4), yaxis="y2",
                         name=f"λ_b·δ(t−t′): mass λ_b = w_b/(1+w_b) = {lam:.3f}<br>"
                              f"(ρ = {rho:g}: {n_boundary(1000, rho) / 10:g}% of each batch at t′)")]
    dt = float(delta_t(torch.tensor(t_prime), ratio))
    title = (f"ψ_t (TCM Eq. 7): t′={t_prime:.3g}, scale={scale:.3g}, ν={nu:.3g}, w_b={w_b:.3g}, T={t_max:g}<br>"
             f"Δt at t′ = {dt:.2e} · median ψ̄ = {float(psi.quantile(0.5)):.3g}")
    with fig.batch_update() if isinstance(fig, go.FigureWidget) else contextlib.nullcontext():
        if len(fig.data) == 3:
            for old, new in zip(fig.data, traces):
                old.x, old.y, old.name = new.x, new.y, new.name
        else:
            for tr in traces:
                fig.add_trace(tr)
        fig.update_layout(title=title, xaxis_type="log", xaxis_title=T_AXIS, height=440,
                          yaxis=dict(title="density per ln t (curves)", rangemode="tozero"), margin=dict(t=90),
                          yaxis2=dict(title="Dirac mass at t′ (vertical line)", overlaying="y", side="right",
                                      range=[0, 1],
                                      tickmode="linear", tick0=0, dtick=0.2, showgrid=False),
                          legend=dict(orientation="h", yanchor="top", y=-0.2, x=0))
    return fig

