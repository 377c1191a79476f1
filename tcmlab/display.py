"""How figures and progress reach a notebook's saved outputs, so that a notebook run headlessly (papermill) reads well
when opened later without a kernel.

- `show(fig)` emits one output with the plotly JSON (interactive in JupyterLab) and a PNG copy rendered by kaleido
  (what nbconvert's HTML and any viewer without plotly show), when a Chromium is available.
- `LiveFigure` shows a plotly figure under a display id and redraws it in place (`update_display`): the figure is
  live in JupyterLab, and the saved notebook holds its final state, never a widget dump.
- `Progress` is a progress line drawn the same way: the saved output says how far the run got, not "0% 0/20".
- `widget(w, note)` displays an ipywidgets widget whose saved text says what it is instead of its repr.

Outside IPython (scripts, the CLI) `show` does nothing and `Progress` prints plain lines.
"""

from __future__ import annotations

import atexit
import base64
import html
import time
import warnings

_KALEIDO = {"state": None, "reason": ""}  # None: not tried yet; True: server running; False: unavailable


def in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


def png(fig, width: int | None = None, height: int | None = None) -> bytes | None:
    """A PNG of a plotly figure through kaleido (a persistent Chromium, started on first use), or None where no
    Chromium is available (the reason is in `png_unavailable()`; a figure that fails alone gets None too)."""
    if _KALEIDO["state"] is False:
        return None
    import plotly.io as pio
    if _KALEIDO["state"] is None:
        try:
            import kaleido
            kaleido.start_sync_server(silence_warnings=True)
            atexit.register(kaleido.stop_sync_server, silence_warnings=True)
            _KALEIDO["state"] = True
        except Exception as e:  # no Chromium, or kaleido cannot start it: figures stay plotly JSON only
            _KALEIDO["state"], _KALEIDO["reason"] = False, f"{type(e).__name__}: {e}".splitlines()[0][:200]
            return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # plotly: "the kopts argument is ignored if using a server"
            return pio.to_image(fig, format="png", width=width or fig.layout.width or 820,
                                height=height or fig.layout.height or 420)
    except Exception as e:
        _KALEIDO["reason"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        return None


def png_unavailable() -> str:
    """Why `png` returns None ('' while it works or was not tried)."""
    return _KALEIDO["reason"]


def bundle(fig, with_png: bool = True) -> dict:
    """The display bundle of a plotly figure: plotly JSON, a PNG copy where kaleido can render one, and a one-line
    text fallback naming the figure (never the figure's repr)."""
    import plotly.graph_objects as go
    fig = go.Figure(fig)
    title = fig.layout.title.text or "figure"
    data = {"application/vnd.plotly.v1+json": fig.to_plotly_json(),
            "text/plain": f"[plotly figure: {title.split('<br>')[0]}]"}
    image = png(fig) if with_png else None
    if image is not None:
        data["image/png"] = base64.b64encode(image).decode()
    return data


def show(fig, with_png: bool = True) -> None:
    """Display a plotly figure as a static output that survives saving (`with_png=False` for redraws that must be
    quick, e.g. under a slider)."""
    if in_ipython():
        from IPython.display import display
        display(bundle(fig, with_png), raw=True)


def output(fig, with_png: bool = False) -> dict:
    """A figure as one nbformat display_data output, e.g. for an ipywidgets `Output`'s `outputs` (set directly
    rather than captured with `with out:`, which papermill's client can wait on forever)."""
    return {"output_type": "display_data", "data": bundle(fig, with_png), "metadata": {}}


class LiveFigure:
    """A plotly figure displayed once and redrawn in place; `finish()` adds the PNG copy to the final state."""

    def __init__(self, fig):
        self.fig, self.handle = fig, None
        if in_ipython():
            from IPython.display import display
            self.handle = display(bundle(fig, with_png=False), raw=True, display_id=True)

    def refresh(self) -> None:
        if self.handle is not None:
            self.handle.update(bundle(self.fig, with_png=False), raw=True)

    def finish(self) -> None:
        if self.handle is not None:
            self.handle.update(bundle(self.fig), raw=True)


class Progress:
    """Progress of a training run from its metrics rows: an HTML bar with a text fallback, redrawn in place (at most
    every `min_interval` s, and always at the end), or plain printed lines outside IPython."""

    def __init__(self, desc: str, start: int, total: int, min_interval: float = 0.5):
        self.desc, self.start, self.total, self.step = desc, start, total, start
        self.t0 = self.t_last = time.perf_counter()
        self.min_interval, self.extra, self.handle = min_interval, "", None
        if in_ipython():
            from IPython.display import display
            self.handle = display(self._bundle(), raw=True, display_id=True)
        else:
            print(self.text(), flush=True)

    def text(self) -> str:
        sec = time.perf_counter() - self.t0
        return (f"{self.desc}: step {self.step}/{self.total} ({100 * self.step / max(self.total, 1):.0f}%), "
                f"{sec:.0f} s this session{self.extra}")

    def _bundle(self) -> dict:
        text = self.text()
        return {"text/plain": text,
                "text/html": f"<progress value='{self.step}' max='{max(self.total, 1)}' style='width:40%'></progress> "
                             f"<code>{html.escape(text)}</code>"}

    def on_log(self, row: dict) -> None:
        if row.get("kind") != "train":
            return
        self.step = int(row["step"])
        self.extra = f", loss {row['loss']:.4g}" if "loss" in row else ""
        now = time.perf_counter()
        if now - self.t_last >= self.min_interval or self.step >= self.total:
            self.t_last = now
            self._draw()

    def _draw(self) -> None:
        if self.handle is not None:
            self.handle.update(self._bundle(), raw=True)
        else:
            print(self.text(), flush=True)

    def close(self, note: str = "") -> None:
        self.extra += note
        self._draw()


def widget(w, note: str) -> None:
    """Display an ipywidgets widget; a saved notebook opened without a kernel shows `note` instead of the widget's
    repr (its text/plain)."""
    from IPython.display import display
    data = w._repr_mimebundle_() or {}
    data["text/plain"] = f"[interactive: {note}; needs a running kernel]"
    display(data, raw=True)
