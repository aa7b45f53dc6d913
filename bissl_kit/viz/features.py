"""Notebook 04's pictures of :mod:`bissl_kit.features`: UMAP panels, the numbers per stage, thumbnails of
chosen images, and :class:`StageExplorer`, the interactive panel with a stage and a colouring switch.

Every picture is drawn from a :class:`~bissl_kit.features.FeatureAnalysis` (numbers and embeddings
computed there); nothing here measures.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image
from plotly.subplots import make_subplots

from ..features import FeatureAnalysis, StageResult
from .figures import figure_widget_class

COLOURINGS = ("class", "knn", "silhouette")

# plotly's default colours, named per class so that a class keeps its colour in every panel and in the
# explorer, whatever other traces a figure holds (plotly's own cycle goes by trace order)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def class_colour(c: int) -> str:
    if c < len(PALETTE):
        return PALETTE[c]
    import colorsys
    r, g, b = colorsys.hsv_to_rgb((c * 0.618034) % 1.0, 0.65, 0.85)
    return f"rgb({int(r * 255)},{int(g * 255)},{int(b * 255)})"


def _axis_range(values: np.ndarray, pad: float = 0.05) -> list[float]:
    lo, hi = float(values.min()), float(values.max())
    span = max(hi - lo, 1e-9)
    return [lo - pad * span, hi + pad * span]


def _hover(analysis: FeatureAnalysis, stage: StageResult) -> tuple[np.ndarray, str]:
    d = analysis.data
    idx = analysis.pictured
    names = d.class_names()
    custom = np.stack([idx, d.eval_source_index[idx], [names[c] for c in d.eval_labels[idx].numpy()],
                       [names[c] for c in stage.knn_pred[idx]], np.round(stage.silhouette_per_image[idx], 3)],
                      axis=1)
    template = (f"{d.split} image #%{{customdata[0]}} ({d.name} #%{{customdata[1]}})<br>class %{{customdata[2]}}, "
                "k-NN says %{customdata[3]}<br>silhouette %{customdata[4]}<extra></extra>")
    return custom, template


def _numbers_line(s: StageResult) -> str:
    return f"k-NN {s.knn:.1%} · probe {s.probe:.1%} · silhouette {s.silhouette:+.3f}"


# JupyterLab's notebook column on a 1366-px laptop screen is about 1000 px wide: figures fit inside it
LAPTOP_WIDTH = 940


def umap_panels(analysis: FeatureAnalysis, *, cols: int = 3, width: int = LAPTOP_WIDTH) -> go.Figure:
    """One UMAP panel per stage, coloured by class, on shared axis ranges; the stage's numbers above it."""
    stages = analysis.stages
    cols = min(cols, len(stages))
    rows = -(-len(stages) // cols)
    fig = make_subplots(rows=rows, cols=cols, horizontal_spacing=0.03, vertical_spacing=0.12 / max(rows - 1, 1) + 0.06,
                        subplot_titles=[f"<b>{s.label}</b><br><span style='font-size:11px'>{_numbers_line(s)}</span>"
                                        for s in stages])
    d = analysis.data
    y = d.eval_labels[analysis.pictured].numpy()
    names = d.class_names()
    allxy = np.concatenate([s.embedding for s in stages])
    xr, yr = _axis_range(allxy[:, 0]), _axis_range(allxy[:, 1])
    shared = analysis.cfg.umap_fit != "pooled"
    for i, s in enumerate(stages):
        row, col = i // cols + 1, i % cols + 1
        custom, template = _hover(analysis, s)
        for c in np.unique(y):
            m = y == c
            fig.add_trace(go.Scattergl(x=s.embedding[m, 0], y=s.embedding[m, 1], mode="markers", name=names[c],
                                       legendgroup=names[c], showlegend=(i == 0), customdata=custom[m],
                                       hovertemplate=template,
                                       marker=dict(size=4, color=class_colour(int(c)), opacity=0.8)), row, col)
        axis_x = dict(showticklabels=False, ticks="", showgrid=False, zeroline=False, mirror=True, showline=True,
                      linecolor="#ccc")
        if shared:
            axis_x["range"] = xr
        fig.update_xaxes(axis_x, row=row, col=col)
        n = i + 1
        fig.update_yaxes(dict(axis_x, scaleanchor=f"x{n if n > 1 else ''}", scaleratio=1,
                              **({"range": yr} if shared else {})), row=row, col=col)
    fig.update_annotations(font_size=13)
    title = (f"Downstream features of the backbone across the pipeline — {d.task}, {d.split} split"
             f"<br><sup>UMAP axes have no units; {analysis.protocols['umap']}</sup>")
    fig.update_layout(title=dict(text=title, x=0.01, font_size=15), width=width, height=60 + 330 * rows + 40,
                      margin=dict(l=20, r=20, t=100, b=20), legend=dict(title="class", itemsizing="constant"),
                      plot_bgcolor="white")
    return fig


def metrics_figure(analysis: FeatureAnalysis, *, width: int = LAPTOP_WIDTH) -> go.Figure:
    """k-NN and linear-probe accuracy (left) and silhouette (right) per stage, protocols underneath."""
    # two-line labels: five one-line ones overlap under the narrower silhouette panel at laptop width
    labels = [s.label.replace(" (", "<br>(") if " (" in s.label else s.label.replace(" ", "<br>", 1)
              for s in analysis.stages]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.57, 0.43], horizontal_spacing=0.09,
                        subplot_titles=("top-1 accuracy on the frozen features", "class separability (silhouette)"))
    for name, attr, colour in (("k-NN", "knn", "#1f77b4"), ("linear probe", "probe", "#ff7f0e")):
        vals = [getattr(s, attr) for s in analysis.stages]
        fig.add_trace(go.Bar(x=labels, y=vals, name=name, marker_color=colour, text=[f"{v:.1%}" for v in vals],
                             textposition="outside", cliponaxis=False), 1, 1)
    sil = [s.silhouette for s in analysis.stages]
    fig.add_trace(go.Bar(x=labels, y=sil, name="silhouette", marker_color="#2ca02c", showlegend=False,
                         text=[f"{v:+.3f}" for v in sil], textposition="outside", cliponaxis=False), 1, 2)
    fig.update_yaxes(title_text="top-1", tickformat=".0%", range=[0, 1.19], tickvals=[0, .2, .4, .6, .8, 1], row=1, col=1)
    lo = min(0.0, min(sil)) * 1.25
    hi = max(0.05, max(sil)) * 1.25
    fig.update_yaxes(title_text="mean silhouette", range=[lo, hi], zeroline=True, zerolinecolor="#999", row=1, col=2)
    fig.update_xaxes(tickangle=0)
    fig.update_xaxes(tickfont_size=11, row=1, col=2)
    p = analysis.protocols
    d = analysis.data
    foot = "<br>".join([f"{d.task}: {d.split} split, {len(d.train_labels)} train → {len(d.eval_labels)} eval images; "
                        f"{p['bn']}",
                        f"k-NN: {p['knn'].split(', ' + str(len(d.train_labels)))[0]}",
                        f"probe: {p['probe'].split('), ')[0]})",
                        f"silhouette: {analysis.cfg.metric} distance in feature space, true classes"])
    fig.add_annotation(text=f"<span style='font-size:11px;color:#555'>{foot}</span>", xref="paper", yref="paper",
                       x=0, y=0, yshift=-60, showarrow=False, align="left", xanchor="left", yanchor="top")
    fig.update_layout(title=dict(text="Frozen-feature numbers per stage", x=0.01), width=width, height=540,
                      barmode="group", margin=dict(l=60, r=20, t=100, b=150), plot_bgcolor="white",
                      legend=dict(orientation="h", x=0.005, y=0.995, xanchor="left", yanchor="top",
                                  bgcolor="rgba(255,255,255,0.8)"))
    fig.update_yaxes(gridcolor="#eee")
    return fig


CAPTION_PX = 16  # caption band under each thumbnail, in montage pixels


def _thumbnail_grid(images: torch.Tensor, cols: int, scale: int, caption_px: int = CAPTION_PX) -> np.ndarray:
    """uint8 N×C×H×W → one uint8 montage (rows × cols tiles, RGB): each image upscaled by ``scale``
    (nearest), a 1-pixel white border and a white caption band of ``caption_px`` under it."""
    n, c, h, w = images.shape
    rows = -(-n // cols)
    tile_h, tile_w = h * scale + 2 + caption_px, w * scale + 2
    out = np.full((rows * tile_h, cols * tile_w, 3), 255, dtype=np.uint8)
    imgs = images.numpy()
    if c == 1:
        imgs = np.repeat(imgs, 3, axis=1)
    imgs = imgs.repeat(scale, axis=2).repeat(scale, axis=3).transpose(0, 2, 3, 1)
    for i in range(n):
        r, q = divmod(i, cols)
        out[r * tile_h + 1:r * tile_h + 1 + h * scale, q * tile_w + 1:q * tile_w + 1 + w * scale] = imgs[i]
    return out


def thumbnails_figure(analysis: FeatureAnalysis, indices, *, title: str, captions=None, cols: int = 12,
                      max_images: int = 48) -> go.Figure:
    """The eval-split images at ``indices`` (at most ``max_images``) as a grid of thumbnails ~64 px
    wide, with a caption under each; one montage PNG inside the figure (small HTML)."""
    indices = [int(i) for i in indices][:max_images]
    if not indices:
        fig = go.Figure()
        fig.update_layout(title=dict(text=title + " — none", x=0.01), width=700, height=120,
                          xaxis_visible=False, yaxis_visible=False, plot_bgcolor="white")
        return fig
    images = analysis.data.eval_images[indices]
    h, w = images.shape[-2:]
    scale = max(1, 64 // w)
    cols = min(cols, len(indices))
    grid = _thumbnail_grid(images, cols, scale)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    fig = go.Figure(go.Image(source=uri, hoverinfo="skip"))
    tile_h, tile_w = h * scale + 2 + CAPTION_PX, w * scale + 2
    captions = captions or [f"#{i}" for i in indices]
    for k, text in enumerate(captions[:len(indices)]):
        r, q = divmod(k, cols)
        fig.add_annotation(x=q * tile_w + tile_w / 2, y=(r + 1) * tile_h - CAPTION_PX / 2, text=text,
                           showarrow=False, font=dict(size=10), yanchor="middle")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    grid_w, grid_h = grid.shape[1], grid.shape[0]
    fig.update_layout(title=dict(text=title, x=0.01, font_size=14), width=max(grid_w + 40, 700),
                      height=grid_h + 90, margin=dict(l=20, r=20, t=70, b=10), plot_bgcolor="white")
    return fig


def _png_data_uri(image: torch.Tensor, scale: int) -> str:
    arr = image.numpy()
    arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
    img = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class StageExplorer:
    """One UMAP panel in JupyterLab with a stage switch and a colouring switch; the plot is a
    ``FigureWidget`` updated in place. Box- or lasso-select points to see their images below it.

    The stage switch is a ``ToggleButtons`` with description "Stage" and the DOM class
    ``bissl-stage-switch`` (the colouring switch: "Colour by", ``bissl-colour-switch``; the thumbnails:
    ``bissl-thumbnails``), so a browser test can find them.
    """

    STAGE_CLASS, COLOUR_CLASS, THUMBS_CLASS = "bissl-stage-switch", "bissl-colour-switch", "bissl-thumbnails"

    def __init__(self, analysis: FeatureAnalysis, *, stage: str | None = None, colouring: str = "class",
                 width: int = 760, height: int = 560):
        import ipywidgets as widgets  # the explorer alone needs them: the static pictures draw without

        if colouring not in COLOURINGS:
            raise ValueError(f"colouring={colouring!r} must be one of {', '.join(COLOURINGS)}")
        self.analysis = analysis
        self.stage_key = stage or analysis.reference
        self.colouring = colouring
        d = analysis.data
        self._y = d.eval_labels[analysis.pictured].numpy()
        self._classes = [int(c) for c in np.unique(self._y)]
        names = d.class_names()
        allxy = np.concatenate([s.embedding for s in analysis.stages])
        fig = go.Figure()
        # traces 0..C-1: one per class; C, C+1: k-NN right / wrong; C+2: silhouette (continuous)
        for c in self._classes:
            fig.add_trace(go.Scattergl(mode="markers", name=names[c], legendgroup="class",
                                       marker=dict(size=6, color=class_colour(c), opacity=0.85)))
        fig.add_trace(go.Scattergl(mode="markers", name="k-NN right", marker=dict(size=6, color="#bbbbbb", opacity=0.7)))
        fig.add_trace(go.Scattergl(mode="markers", name="k-NN wrong", marker=dict(size=7, color="#d62728", symbol="x")))
        fig.add_trace(go.Scattergl(mode="markers", name="silhouette", showlegend=False,
                                   marker=dict(size=6, colorscale="RdBu", cmin=-1, cmax=1,
                                               colorbar=dict(title="silhouette", thickness=12))))
        shared = analysis.cfg.umap_fit != "pooled"
        axis = dict(showticklabels=False, ticks="", showgrid=False, zeroline=False, mirror=True, showline=True,
                    linecolor="#ccc", title_text=None)
        fig.update_layout(width=width, height=height, plot_bgcolor="white", dragmode="lasso",
                          margin=dict(l=20, r=20, t=80, b=20), legend=dict(itemsizing="constant"),
                          xaxis=dict(axis, **({"range": _axis_range(allxy[:, 0])} if shared else {})),
                          yaxis=dict(axis, scaleanchor="x", **({"range": _axis_range(allxy[:, 1])} if shared else {})))
        self.figure = figure_widget_class()(fig)  # the browser's first message holds the whole figure
        self.stage_switch = widgets.ToggleButtons(
            options=[(s.label, s.key) for s in analysis.stages], value=self.stage_key, description="Stage",
            tooltips=[s.source for s in analysis.stages], style={"button_width": "auto"})
        self.stage_switch.add_class(self.STAGE_CLASS)
        self.colour_switch = widgets.ToggleButtons(
            options=[("class", "class"), ("k-NN right/wrong", "knn"), ("silhouette", "silhouette")],
            value=colouring, description="Colour by", style={"button_width": "auto"})
        self.colour_switch.add_class(self.COLOUR_CLASS)
        self.thumbnails = widgets.HTML("<i>Select points (lasso or box) to see their images here.</i>")
        self.thumbnails.add_class(self.THUMBS_CLASS)
        self.stage_switch.observe(lambda ch: self.show(stage=ch["new"]), names="value")
        self.colour_switch.observe(lambda ch: self.show(colouring=ch["new"]), names="value")
        for trace in self.figure.data:
            trace.on_selection(self._on_selection)
        self.widget = widgets.VBox([self.stage_switch, self.colour_switch, self.figure, self.thumbnails])
        self.show()

    def show(self, *, stage: str | None = None, colouring: str | None = None) -> None:
        """Redraw in place: the stage's embedding and hover text, the chosen colouring, the title."""
        self.stage_key = stage or self.stage_key
        self.colouring = colouring or self.colouring
        s = self.analysis.stage(self.stage_key)
        custom, template = _hover(self.analysis, s)
        xy = s.embedding
        ncls = len(self._classes)
        correct = s.knn_correct[self.analysis.pictured]
        groups = [self._y == c for c in self._classes] + [correct, ~correct, np.ones(len(xy), bool)]
        visible = ([self.colouring == "class"] * ncls + [self.colouring == "knn"] * 2 + [self.colouring == "silhouette"])
        with self.figure.batch_update():
            for i, (trace, m) in enumerate(zip(self.figure.data, groups)):
                trace.x, trace.y = xy[m, 0], xy[m, 1]
                trace.customdata, trace.hovertemplate = custom[m], template
                trace.visible = visible[i]
                trace.selectedpoints = None
            self.figure.layout.title.text = (f"<b>{s.label}</b> — {_numbers_line(s)}"
                                             f"<br><sup>{self.analysis.data.task}, {self.analysis.data.split} split; "
                                             "UMAP axes have no units</sup>")
        # outside the batch: a batched update that sets marker.color on one trace sends null for the
        # others, and the browser then draws the class traces in plotly's default palette
        self.figure.data[-1].marker.color = s.silhouette_per_image[self.analysis.pictured]
        self.thumbnails.value = "<i>Select points (lasso or box) to see their images here.</i>"

    def _on_selection(self, trace, points, selector) -> None:
        if not points.point_inds:
            return
        idx = [int(trace.customdata[i][0]) for i in points.point_inds][:60]
        self.select(idx)

    def select(self, indices) -> None:
        """Show the images of these eval-split indices under the plot (also callable from code)."""
        d = self.analysis.data
        s = self.analysis.stage(self.stage_key)
        names = d.class_names()
        scale = max(1, 48 // d.eval_images.shape[-1])
        tiles = "".join(
            f"<figure style='display:inline-block;margin:2px;text-align:center;font-size:10px'>"
            f"<img src='{_png_data_uri(d.eval_images[i], scale)}' style='image-rendering:pixelated'>"
            f"<figcaption>#{i} {names[int(d.eval_labels[i])]}"
            f"{'' if s.knn_correct[i] else ' → ' + names[int(s.knn_pred[i])]}</figcaption></figure>"
            for i in indices)
        self.thumbnails.value = (f"<b>{len(indices)} selected image(s)</b> (class; → the k-NN's wrong answer at "
                                 f"this stage)<br>{tiles}")

    def _ipython_display_(self):
        from IPython.display import display
        display(self.widget)
