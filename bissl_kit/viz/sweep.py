"""Notebook 06's figure: the sensitivity of BiSSL − baseline to a swept field, with the 95 % CIs over BiSSL
replicates (over fine-tuning seeds where a point has one BiSSL run)."""

from __future__ import annotations

import plotly.graph_objects as go

from ..downstream import METRIC_LABELS
from ..reports import ARM_LABELS
from .figures import FigurePaths, export_figure

TASK_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e")


# the axis names of the BiSSL fields most often swept, as the paper writes them
FIELD_LABELS = {"lam": "λ (lam)", "gamma": "γ (gamma)", "damping": "δ (damping)", "solver_iters": "K (solver_iters)",
                "lower_steps": "N_L (lower_steps)", "upper_steps": "N_U (upper_steps)"}


def _numeric_axis(sweep: dict) -> tuple[str, list[float]] | None:
    """The swept field and the points' values when every point sets that one numeric field."""
    field = sweep["config"].get("field")
    if not field or sweep["config"].get("points"):
        return None
    values = [p["fields"].get(field) for p in sweep["points"]]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return field, [float(v) for v in values]
    return None


def sensitivity_figure(sweep: dict, metric: str = "test_top1", a: str = "bissl", b: str = "baseline_matched") -> go.Figure:
    """Per task: the mean difference a − b (points) at each sweep point with its 95 % CI, and a zero line."""
    rows = [r for r in sweep["rows"] if r["metric"] == metric and r["a"] == a and r["b"] == b and r["n"]]
    axis = _numeric_axis(sweep)
    names = [p["name"] for p in sweep["points"]]
    x_of = dict(zip(names, axis[1])) if axis else {n: n for n in names}
    fig = go.Figure()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for i, task in enumerate(tasks):
        rs = sorted((r for r in rows if r["task"] == task), key=lambda r: names.index(r["point"]))
        y = [100 * r["mean_diff"] for r in rs]
        up = [100 * (r["hi"] - r["mean_diff"]) if r["hi"] == r["hi"] else 0 for r in rs]  # NaN CI: no bar
        down = [100 * (r["mean_diff"] - r["lo"]) if r["lo"] == r["lo"] else 0 for r in rs]
        unit = rs[0]["unit"] if rs else ""
        fig.add_trace(go.Scatter(
            x=[x_of[r["point"]] for r in rs], y=y, mode="markers+lines", name=f"{task} (95% CI; {unit})",
            marker=dict(size=10, color=TASK_COLOURS[i % len(TASK_COLOURS)]),
            error_y=dict(type="data", symmetric=False, array=up, arrayminus=down, thickness=1.5, width=6),
            hovertext=[f"{r['point']}: {100 * r['mean_diff']:+.2f} points, p = {r['p']:.3g}, n = {r['n']}" for r in rs]))
    fig.add_hline(y=0, line=dict(color="grey", dash="dot"))
    log = bool(axis) and min(axis[1]) > 0 and max(axis[1]) / min(axis[1]) >= 10
    split, _, name = metric.partition("_")
    what = f"{split} {METRIC_LABELS.get(name, name)}"  # 'test top-1', 'test mAP'
    fig.update_layout(title=f"{ARM_LABELS[a]} − {ARM_LABELS[b]}, {what}, by sweep point",
                      xaxis_title=FIELD_LABELS.get(axis[0], axis[0]) if axis else "point",
                      yaxis_title="difference, points (95% CI)", showlegend=True,
                      template="plotly_white", width=760, height=440, legend=dict(orientation="h", y=-0.2))
    if log:
        fig.update_xaxes(type="log")
    elif not axis:
        fig.update_xaxes(type="category", categoryorder="array", categoryarray=names)
    return fig


def export_sweep(sweep: dict, figures_dir, stem: str = "sweep") -> FigurePaths:
    """The sensitivity figure as ``stem.html`` and ``stem.png`` in ``figures_dir``."""
    return export_figure(sensitivity_figure(sweep), stem, figures_dir)
