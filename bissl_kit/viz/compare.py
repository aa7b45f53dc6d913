"""Notebook 05's figures: the comparison (each seed per arm, means with their 95 % t-intervals) and the
live search."""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..reports import ARM_LABELS
from .figures import FigurePaths, LiveFigure, export_figure

ARM_COLOURS = {"baseline": "#7f7f7f", "baseline_matched": "#1f77b4", "bissl": "#d62728"}


def comparison_figure(results: dict, metric: str = "test_top1") -> go.Figure:
    """Per task: each seed's test accuracy per arm (grey lines join the same seed), and the mean with its
    95 % t-interval."""
    tasks = results["tasks"]
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=[t["task"] for t in tasks])
    for col, t in enumerate(tasks, start=1):
        arms = list(t["arms"])
        # a multi-label task (VOC07) reports test mAP where the others report top-1/top-5
        key = metric if metric in t["arms"][arms[0]] else "test_map"
        by_seed: dict[int, list] = {}
        for i, arm in enumerate(arms):
            for s in t["arms"][arm]["seeds"]:
                if s["status"] == "ok":
                    by_seed.setdefault(s["seed"], []).append((i, s[key]))
        for seed, pts in by_seed.items():
            fig.add_trace(go.Scatter(x=[p[0] - 0.12 for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                                     line=dict(color="rgba(120,120,120,0.35)", width=1),
                                     marker=dict(size=6, color=[ARM_COLOURS[arms[p[0]]] for p in pts]),
                                     name=f"seed {seed}", showlegend=False,
                                     hovertemplate=f"seed {seed}: %{{y:.2%}}<extra></extra>"), 1, col)
        for i, arm in enumerate(arms):
            m = t["arms"][arm][key]
            if m is None:
                continue
            half = 0.0 if math.isnan(m["half_width"]) else m["half_width"]
            fig.add_trace(go.Scatter(x=[i + 0.12], y=[m["mean"]], mode="markers",
                                     marker=dict(size=11, symbol="diamond", color=ARM_COLOURS[arm]),
                                     error_y=dict(type="data", array=[half], color=ARM_COLOURS[arm], thickness=2),
                                     name=ARM_LABELS[arm], showlegend=col == 1,
                                     hovertemplate=f"{ARM_LABELS[arm]}: mean %{{y:.2%}} ± {half:.2%} "
                                                   f"(95% CI, n={m['n']})<extra></extra>"), 1, col)
        fig.update_xaxes(tickvals=list(range(len(arms))), ticktext=[ARM_LABELS[a] for a in arms],
                         range=[-0.5, len(arms) - 0.5], row=1, col=col)
        fig.update_yaxes(tickformat=".1%", row=1, col=col)
    what = metric.replace("test_top", "top-") + (" (mAP: multi-label tasks)" if any(
        "test_map" in next(iter(t["arms"].values())) for t in tasks) else "")
    fig.update_yaxes(title_text=f"test {what}", row=1, col=1)
    c = results["config"]
    fig.update_layout(title=dict(text=f"Baseline vs BiSSL: test {what} per seed, and mean ± 95% t-interval"
                                      f"<br><sup>{c['trials']} search trials per arm (val), "
                                      f"{c['seeds']} seeds, {c['epochs']} fine-tuning epochs; lines join runs "
                                      f"with the same seed</sup>"),
                      height=430, width=max(520, 430 * len(tasks)), margin=dict(t=100, b=60),
                      legend=dict(orientation="h", y=-0.18))
    return fig



def export_comparison(results: dict, cfg) -> FigurePaths:
    """The comparison figure of ``results`` written to ``cfg.figures_dir/cfg.figure_stem.{html,png}``
    (nothing when ``figures_dir`` is None). Called by whoever ran the comparison (the command line,
    notebook 05), so that :func:`bissl_kit.compare.run_comparison` itself needs no plotly."""
    if cfg.figures_dir is None:
        return FigurePaths()
    return export_figure(comparison_figure(results), cfg.figure_stem, cfg.figures_dir)


class SearchMonitor:
    """Live view of a comparison: each trial's val top-1 against its lr, per arm (one panel per task)."""

    def __init__(self, tasks, arms, *, live: bool):
        fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=[f"{t}: search trials (val)" for t in tasks])
        self.index = {}
        for col, task in enumerate(tasks, start=1):
            for arm in arms:
                self.index[(task, arm)] = len(fig.data)
                fig.add_trace(go.Scatter(mode="markers", name=ARM_LABELS[arm], showlegend=col == 1,
                                         marker=dict(color=ARM_COLOURS[arm], size=8)), 1, col)
            fig.update_xaxes(type="log", title_text="learning rate", row=1, col=col)
            fig.update_yaxes(tickformat=".0%", row=1, col=col)
        fig.update_yaxes(title_text="val top-1", row=1, col=1)
        fig.update_layout(height=380, width=max(520, 430 * len(tasks)), margin=dict(t=60, b=50),
                          title="Random search: val top-1 of each trial")
        self.figure = LiveFigure(fig, live=live)

    def update(self, task, arm, what, rec) -> None:
        if what == "trial" and rec["status"] == "ok":
            # val top-1, or val mAP for a multi-label task (VOC07): the number the search selects on
            self.figure.extend(self.index[(task, arm)], rec["lr"], rec.get("val_top1", rec.get("val_map")))

    def finish(self, stem=None, figures_dir="figures") -> dict:
        return self.figure.finish(stem, figures_dir)
