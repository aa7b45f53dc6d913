"""Figures: live in JupyterLab, static when headless, and exported to ``figures/``.

What every figure of :mod:`bissl_kit.viz` is built with; each stage's figures live beside this module.

In JupyterLab a :class:`LiveFigure` is a plotly ``FigureWidget`` (it needs ``anywidget`` with plotly
≥ 7) that the training loop updates while it runs; data pushed from the kernel reaches the page
even while the cell is busy. Headless (papermill, CI) it is a plain figure drawn once at the end:
a FigureWidget saved in a notebook carries megabytes of widget state (the plotly.js bundle).

Every figure is exported as HTML (always; plotly.js is written once beside it as
``plotly.min.js``) and as PNG when kaleido finds a Chromium.
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from pathlib import Path

import plotly.graph_objects as go

# how often a live figure is redrawn at most: every update re-sends the traces to the browser
LIVE_REDRAW_SECONDS = 0.5


@functools.lru_cache(maxsize=1)
def widgets_available() -> bool:
    """plotly's FigureWidget needs anywidget (plotly ≥ 7) and ipywidgets.

    Checked by import, not by building a throwaway FigureWidget: that opens a second widget model
    in the browser, and with it JupyterLab dropped most updates of the live figure (5 runs in 8 in a
    browser test; 0 in 6 without it)."""
    try:
        import anywidget  # noqa: F401
        import ipywidgets  # noqa: F401
        from plotly.basewidget import BaseFigureWidget  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def figure_widget_class() -> type:
    """``go.FigureWidget`` whose comm opens with the figure in its first message.

    plotly's FigureWidget opens its comm (ipywidgets does so in the constructor) before it sets the
    figure's data and layout, which follow as separate updates. In JupyterLab the browser now and
    then draws the view from the first message alone: an empty 360-px plot that later updates cannot
    fill (seen by tests/test_browser.py in about one run in three, on a loaded machine). Opening the
    comm once the figure is built removes the race."""

    class FigureWidget(go.FigureWidget):
        _defer_open = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._defer_open = False
            self.open()

        def open(self):
            if not self._defer_open:
                super().open()

    return FigureWidget


class LiveFigure:
    """A figure whose traces grow while a loop runs.

    ``extend(trace, x, y)`` appends points; ``live=True`` redraws the widget at most every
    ``LIVE_REDRAW_SECONDS``; ``finish()`` draws the final state (and, headless, displays it once).
    """

    def __init__(self, fig: go.Figure, *, live: bool, display: bool = True):
        self.live = live and widgets_available()
        if live and not self.live:
            warnings.warn("plotly FigureWidget is unavailable (install anywidget); showing a static figure")
        # Live, the widget takes the width of the notebook (a fixed width wider than a laptop's notebook
        # column cuts off the right-hand panels); exports keep the figure's own width.
        self.export_width = fig.layout.width
        if self.live:
            fig = go.Figure(fig).update_layout(width=None, autosize=True)
        self.fig = figure_widget_class()(fig) if self.live else fig
        self._data: dict[int, tuple[list, list]] = {}  # only the traces fed by extend()
        self._last = 0.0
        self._display = display
        if self.live and display:
            from IPython.display import display as ipy_display
            ipy_display(self.fig)

    def extend(self, trace: int, x, y) -> None:
        xs, ys = self._data.setdefault(trace, ([], []))
        xs.append(x)
        ys.append(y)
        if self.live and time.monotonic() - self._last > LIVE_REDRAW_SECONDS:
            self.redraw()

    def redraw(self) -> None:
        with self.fig.batch_update():
            for i, (xs, ys) in self._data.items():
                self.fig.data[i].x = list(xs)
                self.fig.data[i].y = list(ys)
        self._last = time.monotonic()

    def finish(self, stem: str | None = None, figures_dir: str | Path = "figures") -> dict:
        """Draw the final state; export to ``figures_dir/stem.{html,png}`` when ``stem`` is given;
        headless, display the figure once (as PNG when possible). Returns the written paths."""
        self.redraw()
        fig = go.Figure(self.fig).update_layout(width=self.export_width)
        paths = export_figure(fig, stem, figures_dir) if stem else FigurePaths()
        if not self.live and self._display:
            show_static(self.fig, paths.get("png"))
        return paths


class FigurePaths(dict):
    """``{"html": Path, "png": Path}``; shown in a notebook as one line saying where the figure went
    (the last line of a cell is displayed, and a dict of PosixPaths under a dashboard only confuses)."""

    def __repr__(self) -> str:
        if not self:
            return "(figure not exported)"
        folder = next(iter(self.values())).parent
        return f"figure written to {folder}: " + ", ".join(p.name for p in self.values())

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


def export_figure(fig: go.Figure, stem: str, figures_dir: str | Path = "figures") -> FigurePaths:
    """Write ``stem.html`` (always) and ``stem.png`` (when kaleido can start a Chromium)."""
    out = Path(figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = FigurePaths(html=out / f"{stem}.html")
    fig.write_html(paths["html"], include_plotlyjs="directory")
    png = out / f"{stem}.png"
    if png_export_available():
        with _quiet_kaleido():
            fig.write_image(png, scale=2)
        paths["png"] = png
    return paths


@contextlib.contextmanager
def _quiet_kaleido():
    """plotly passes browser options that kaleido's persistent server ignores and warns about it on
    the first export: a red box under the dashboard that tells the user nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The kopts argument is ignored")
        yield


@functools.lru_cache(maxsize=1)
def png_export_available() -> bool:
    """True when kaleido can render (it needs a Chromium, e.g. Debian's ``chromium``).

    Starts kaleido's persistent browser once, so that an export does not pay a browser start per figure."""
    try:
        import kaleido
        kaleido.start_sync_server(silence_warnings=True)
        with _quiet_kaleido():
            go.Figure().to_image(format="png", width=10, height=10)
    except Exception as e:  # kaleido raises its own types when no browser is found
        warnings.warn(f"PNG export unavailable ({type(e).__name__}); figures are written as HTML only. "
                      "Install a Chromium (Debian: apt-get install chromium) for PNGs.")
        return False
    return True


def show_static(fig: go.Figure, png: Path | None = None) -> None:
    """Display a figure without embedding plotly.js (megabytes per figure in the saved notebook):
    the PNG when there is one, otherwise a note pointing to the HTML export."""
    from IPython.display import Image, Markdown, display
    if png is not None:
        display(Image(filename=str(png)))
    else:
        display(Markdown("*(static figure: PNG export unavailable; see the exported HTML)*"))
