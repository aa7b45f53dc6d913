"""Notebook 01's figures: the live pre-training curves and the k-NN bar chart."""

from __future__ import annotations

import plotly.graph_objects as go

from plotly.subplots import make_subplots

from .figures import LiveFigure


class PretrainMonitor:
    """Pre-training loss and k-NN accuracy against the step, fed with :class:`Pretrainer` records."""

    def __init__(self, *, live: bool, title: str = "Pre-training"):
        fig = make_subplots(rows=1, cols=2, subplot_titles=("pretext loss", "k-NN accuracy (monitor set, val)"))
        fig.add_trace(go.Scatter(mode="lines", name="loss", line=dict(color="#1f77b4")), 1, 1)
        fig.add_trace(go.Scatter(mode="lines+markers", name="k-NN top-1", line=dict(color="#d62728")), 1, 2)
        fig.update_xaxes(title_text="optimiser step", row=1, col=1)
        fig.update_xaxes(title_text="optimiser step", row=1, col=2)
        fig.update_yaxes(title_text="loss", row=1, col=1)
        fig.update_yaxes(title_text="accuracy", tickformat=".1%", row=1, col=2)
        fig.update_layout(title=title, height=400, width=900, showlegend=False, margin=dict(t=110, b=50))
        self.figure = LiveFigure(fig, live=live)
        self.title = title

    def update(self, record: dict) -> None:
        kind = record.get("kind", "knn" if "knn" in record else "step")  # records written before kinds existed
        if kind == "step":
            self.figure.extend(0, record["step"], record["loss"])
        elif kind == "knn":
            self.figure.extend(1, record["step"], record["knn"])
            self.figure.fig.layout.title.text = f"{self.title}<br><sup>k-NN: {record['protocol']}</sup>"

    def finish(self, stem: str, figures_dir="figures") -> dict:
        return self.figure.finish(stem, figures_dir)


def knn_comparison(rows: list[tuple[str, float]], protocol: str, title: str) -> go.Figure:
    """Bar chart of k-NN accuracies (label, accuracy) with the protocol under the title."""
    fig = go.Figure(go.Bar(x=[r[0] for r in rows], y=[r[1] for r in rows],
                           text=[f"{r[1]:.1%}" for r in rows], textposition="outside",
                           # one colour per network, lighter under the as-held ('running') BN protocol
                           marker_color=["#7f7f7f" if "random" in r[0].lower() else "#1f77b4" for r in rows],
                           marker_opacity=[0.5 if "running" in r[0].lower() else 1.0 for r in rows]))
    fig.update_layout(title=dict(text=f"{title}<br><sup>{protocol}</sup>"), height=380, width=560,
                      yaxis=dict(title="top-1 accuracy", tickformat=".0%", range=[0, 1.08]),
                      margin=dict(t=80, b=50))
    return fig
