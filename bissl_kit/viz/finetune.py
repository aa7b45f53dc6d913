"""Notebook 03's figure: the live fine-tuning curves of one run."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .. import distributed
from .figures import FigurePaths, LiveFigure


class FinetuneMonitor:
    """Train loss and lr per step, val top-1/top-5 per epoch; fed with :class:`Finetuner` records."""

    def __init__(self, *, live: bool, title: str = "Fine-tuning"):
        fig = make_subplots(rows=1, cols=2, subplot_titles=("train loss (per step)", "val accuracy (per epoch)"),
                            specs=[[{"secondary_y": True}, {}]])
        fig.add_trace(go.Scatter(mode="lines", name="train loss", line=dict(color="#1f77b4")), 1, 1)
        fig.add_trace(go.Scatter(mode="lines", name="lr", line=dict(color="#aaaaaa", dash="dot")), 1, 1, secondary_y=True)
        fig.add_trace(go.Scatter(mode="lines+markers", name="val top-1", line=dict(color="#d62728")), 1, 2)
        fig.add_trace(go.Scatter(mode="lines+markers", name="val top-5", line=dict(color="#ff9896")), 1, 2)
        fig.update_xaxes(title_text="epoch", row=1, col=1)
        fig.update_xaxes(title_text="epoch", row=1, col=2)
        fig.update_yaxes(title_text="cross-entropy", row=1, col=1)
        fig.update_yaxes(title_text="lr", row=1, col=1, secondary_y=True, showgrid=False)
        fig.update_yaxes(title_text="accuracy", tickformat=".0%", row=1, col=2)
        fig.update_layout(title=title, height=400, width=950, margin=dict(t=110, b=50),
                          legend=dict(orientation="h", y=-0.2))
        self.figure = LiveFigure(fig, live=live)
        self.title = title

    def update(self, record: dict) -> None:
        kind = record.get("kind")
        if kind == "step":
            self.figure.extend(0, record["epoch"], record["loss"])
            self.figure.extend(1, record["epoch"], record["lr"])
        elif kind == "epoch" and "val_top1" in record:
            self.figure.extend(2, record["epoch"], record["val_top1"])
            self.figure.extend(3, record["epoch"], record["val_top5"])
        elif kind == "epoch" and "val_map" in record:  # a multi-label task: its mAP on the top-1 trace
            self.figure.extend(2, record["epoch"], record["val_map"])
        elif kind == "final":
            self.figure.fig.layout.title.text = f"{self.title}<br><sup>{record['protocol']}</sup>"

    def finish(self, stem: str, figures_dir="figures") -> dict:
        """Export the figure (rank 0 alone under torchrun; the other ranks write and show nothing)."""
        if not distributed.is_main():
            return FigurePaths()
        return self.figure.finish(stem, figures_dir)
