"""The denoising–generation trade-off over trained models: a t′ sweep (`tcmlab.sweep`) read back for notebook 03.

`TPrimeSweep(folder)` reads a finished sweep's `results.csv` whose stage-2 points vary `loss.t_prime` (alone, or as
one row of a one-at-a-time ablation such as sweeps/digits_claims.toml: `_tprime_slice`); for a chosen
t′ it draws that model's dFID_t against stage 1 and the control (mean ± std over seeds, t′ marked), 1-step FID
against t′ with the chosen point marked, and 1-step samples of that model beside stage 1's from the same noise.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .plots import sample_panels

T_PRIME = "s2.loss.t_prime"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _tprime_slice(rows: list[dict], path: Path) -> list[dict]:
    """The stage-2 rows of the one setting of the other grid fields that the sweep trains at the most t′ values: the
    whole stage 2 of a sweep over t′ alone, the t′ row of a one-at-a-time ablation (sweeps/digits_claims.toml).
    Refused where several settings share that most (a product grid: they would be averaged as if they were seeds)."""
    others = [c for c in rows[0] if c.startswith(("s0.", "s1.", "s2.")) and c != T_PRIME]
    by_setting: dict[tuple, set] = {}
    for r in rows:
        if r["kind"] == "stage2":
            by_setting.setdefault(tuple(r[c] for c in others), set()).add(r[T_PRIME])
    most = max(map(len, by_setting.values()), default=0)
    best = [k for k, v in by_setting.items() if len(v) == most]
    if len(best) > 1 and most == 1:
        raise ValueError(f"{path} trains one t′ per setting of its other grid fields: there is no row over t′ to "
                         f"show (a sweep over loss.t_prime, alone or as one table of a one-at-a-time grid, is)")
    if len(best) > 1:
        varied = [c for i, c in enumerate(others) if len({k[i] for k in best}) > 1]
        raise ValueError(f"{path} varies {', '.join(varied)} together with t′: this view needs one setting of the "
                         f"other fields over several t′ (points differing in those would be averaged as if they "
                         f"were seeds)")
    keep = best[0] if best else ()
    return [r for r in rows if r["kind"] == "stage2" and tuple(r[c] for c in others) == keep]


class TPrimeSweep:
    """A t′ sweep's results, indexed by (kind, t′) for stage-2 points and by kind for stage 1 and the control."""

    def __init__(self, folder: str | Path):
        from .sweep import read_csv
        self.folder = Path(folder)
        path = self.folder / "results.csv"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `python -m tcmlab sweep SPEC` with a grid over "
                                    f"loss.t_prime first (e.g. sweeps/digits_claims.toml), then pass its out folder")
        rows = read_csv(path)
        if not rows or T_PRIME not in rows[0]:
            raise ValueError(f"{path} has no {T_PRIME} column: this sweep does not vary t′")
        self.rows = [r for r in rows if r["kind"] != "stage2"] + _tprime_slice(rows, path)
        self.t_primes = sorted({float(r[T_PRIME]) for r in self.rows if r["kind"] == "stage2"})
        if not self.t_primes:
            raise ValueError(f"{path} holds no evaluated stage-2 points")

    def _select(self, kind: str, t_prime: float | None, metric: str) -> list[dict]:
        return [r for r in self.rows if r["kind"] == kind and r["metric"] == metric
                and (t_prime is None or float(r[T_PRIME]) == t_prime)]

    def dfid(self, kind: str, t_prime: float | None = None) -> dict[float, tuple[float, float]]:
        """{t: (mean, std over seeds)} of dFID_t for one kind (stage1, control, or stage2 at t′)."""
        by_t: dict[float, list[float]] = {}
        for r in self._select(kind, t_prime, "dfid"):
            by_t.setdefault(float(r["t"]), []).append(float(r["value"]))
        return {t: _mean_std(v) for t, v in sorted(by_t.items())}

    def fid(self, kind: str, t_prime: float | None = None, metric: str = "fid_1step") -> tuple[float, float] | None:
        values = [float(r["value"]) for r in self._select(kind, t_prime, metric)]
        return _mean_std(values) if values else None

    def floor(self) -> float | None:
        floors = [float(r["floor"]) for r in self.rows if r["metric"] == "fid_1step" and r.get("floor")]
        return statistics.fmean(floors) if floors else None

    def run_dir(self, kind: str, t_prime: float | None = None, seed: int | None = None) -> Path:
        """The run directory of one point (the lowest seed unless given)."""
        rows = [r for r in self._select(kind, t_prime, "fid_1step") if seed is None or int(r["seed"]) == seed]
        if not rows:
            raise ValueError(f"no evaluated {kind} point" + (f" at t′={t_prime:g}" if t_prime is not None else ""))
        return self.folder / min(rows, key=lambda r: int(r["seed"]))["point"]

    def figure(self, t_prime: float) -> go.Figure:
        """Left: dFID_t of stage 2 at t′ against stage 1 and the control; right: 1-step FID against t′ (mean ± std
        over seeds), the chosen t′ marked, stage 1 / control / the real-vs-real floor as dotted references."""
        fig = make_subplots(rows=1, cols=2, subplot_titles=(f"dFID_t: stage 2 trained at t′ = {t_prime:g}",
                                                            "1-step FID against t′"))
        curves = (("stage 1", "stage1", None), ("control: stage 1 continued", "control", None),
                  (f"stage 2, t′ = {t_prime:g}", "stage2", t_prime))
        for label, kind, tp in curves:
            d = self.dfid(kind, tp)
            if d:
                fig.add_scatter(x=list(d), y=[m for m, _ in d.values()], mode="lines+markers", name=label,
                                error_y=dict(array=[s for _, s in d.values()]), row=1, col=1)
        fig.add_vline(x=t_prime, line_dash="dot", row=1, col=1)
        # plotly places annotations on a log axis by log10 of the position (see plots.mark_x)
        fig.add_annotation(x=math.log10(t_prime), xref="x", y=1, yref="y domain", text=" t′", showarrow=False,
                           xanchor="left", yanchor="top")
        fid = [self.fid("stage2", tp) for tp in self.t_primes]
        fig.add_scatter(x=self.t_primes, y=[m for m, _ in fid], error_y=dict(array=[s for _, s in fid]),
                        mode="lines+markers", name="stage 2 (each t′)", row=1, col=2)
        chosen = self.fid("stage2", t_prime)
        fig.add_scatter(x=[t_prime], y=[chosen[0]], mode="markers", marker=dict(size=14, symbol="circle-open"),
                        name=f"t′ = {t_prime:g}: {chosen[0]:.1f} ± {chosen[1]:.1f}", row=1, col=2)
        x_span = [min(self.t_primes), max(self.t_primes)]
        for label, value in (("stage 1", self.fid("stage1")), ("control", self.fid("control")),
                             ("real-vs-real floor", (self.floor(), 0) if self.floor() else None)):
            if value is not None:
                fig.add_scatter(x=x_span, y=[value[0]] * 2, mode="lines", line_dash="dot",
                                name=f"{label}: {value[0]:.1f}", row=1, col=2)
        seeds = len({r["seed"] for r in self.rows})
        fig.update_xaxes(type="log", title_text="noise level t (log scale)", row=1, col=1)
        fig.update_xaxes(type="log", title_text="dividing time t′ (log scale)", row=1, col=2)
        fig.update_yaxes(type="log", title_text="dFID_t (log scale)", row=1, col=1)
        fig.update_yaxes(title_text="1-step FID", row=1, col=2)
        fig.update_layout(title=f"the trade-off at t′ = {t_prime:g} ({seeds} seeds, mean ± std): {self.folder.name}",
                          height=430, legend=dict(orientation="h", yanchor="top", y=-0.2, x=0),
                          margin=dict(t=90, b=120))
        return fig

    def samples(self, t_prime: float, device: str = "cpu", n: int = 36) -> go.Figure:
        """1- and 2-step samples of the stage-2 model trained at t′ beside stage 1's (lowest seed, same noise;
        stage 1 only where the sweep evaluated it)."""
        from .model import load_model
        models = {}
        if self._select("stage1", None, "fid_1step"):  # a sweep may leave stage 1 out of its evaluation
            models["stage 1"] = load_model(self.run_dir("stage1"), device=device)
        models[f"stage 2, t′ = {t_prime:g}"] = load_model(self.run_dir("stage2", t_prime), device=device)
        return sample_panels(models, t_mid=max(self.t_mid(), t_prime), n=n)

    def t_mid(self) -> float:
        """The sweep's 2-step time (`[eval] t_mid`, read off the stage-1/control 2-step FID cards; 1.0, the paper's
        CIFAR-10 value, where the tables have none): the samples match the 2-step FID the sweep reported."""
        for r in self._select("stage1", None, "fid_2step") + self._select("control", None, "fid_2step"):
            steps = json.loads(r.get("card") or "{}").get("steps") or []
            if len(steps) == 2:
                return float(steps[1])
        return 1.0
