"""The BiSSL dashboard of notebook 02: losses, gradient alignment, solver residuals, distance, accuracy.

Fed with :class:`~bissl_kit.bissl.BisslTrainer` records. The x axis is the stage, continuous: the
k-th lower step of stage s sits at s − 1 + k/(N_L + N_U), the k-th upper step at
s − 1 + (N_L + k)/(N_L + N_U), so both levels share one time line.

Panels and their definitions (docs/… in the notebook's story):

* losses: lower pretext loss L_P(θ_P, φ_P); upper implicit-term loss L_D(θ_P, φ_D) and classic
  loss L_D(θ_D, φ_D);
* alignment: cos(x, ∇_θD L_D(θ_D, φ_D)) — does the implicit hypergradient x push θ_D the way
  plain fine-tuning would? — and cos(x, ∇_θP L_P) against the pretext gradient of the last lower
  step (negative: the downstream wants what the pretext task resists);
* per-layer alignment: the first cosine per layer group (stem, layer1.0, …) and upper step;
* solver (CG, MINRES or the layerwise recursion): relative residual ‖v − A x_k‖/‖v‖ per iteration of the latest
  solves, from the start point x_0 (0, or the warm start) (log scale);
* distance ‖θ_P − θ_D‖, and val top-1 of (θ_D, φ_D) per stage.

:func:`controls` builds the ipywidgets panel with a "run N stages" button. A widget cannot steer a
cell that is running (the kernel handles widget messages between cells), so the button's handler
is itself the training loop: it runs when the notebook is idle and pushes updates to the figure.
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .figures import LiveFigure

LAYER_COLORSCALE = "RdBu"
RESIDUAL_HISTORY = 8  # solves drawn in the residual panel (the latest ones)

# trace indices
(T_PRETEXT, T_IMPLICIT, T_CLASSIC, T_COS_CLASSIC, T_COS_PRETEXT, T_HEAT, T_DIST, T_ACC) = range(8)
T_RESIDUAL0 = 8
STAGE_PANELS = ((1, 1), (1, 2), (3, 1), (3, 2))  # (row, col) of the panels whose x axis is the stage


class BisslDashboard:
    def __init__(self, *, live: bool, layer_names: list[str], lower_steps: int, upper_steps: int,
                 title: str = "BiSSL stage"):
        fig = make_subplots(
            rows=3, cols=2, vertical_spacing=0.11, horizontal_spacing=0.16,
            subplot_titles=("losses", "gradient alignment (cosine)", "per-layer cos(implicit, classic)",
                            "solver relative residual, latest solves", "‖θ_P − θ_D‖", "val top-1 of (θ_D, φ_D)"))
        line = dict(width=1.5)
        fig.add_trace(go.Scatter(name="lower: pretext L_P", mode="lines", line=dict(color="#1f77b4", **line)), 1, 1)
        fig.add_trace(go.Scatter(name="upper: L_D(θ_P, φ_D)", mode="lines", line=dict(color="#d62728", **line)), 1, 1)
        fig.add_trace(go.Scatter(name="upper: L_D(θ_D, φ_D)", mode="lines", line=dict(color="#ff7f0e", dash="dot", **line)), 1, 1)
        fig.add_trace(go.Scatter(name="cos(x, ∇θD L_D)", mode="lines+markers", marker=dict(size=4),
                                 line=dict(color="#2ca02c", **line)), 1, 2)
        fig.add_trace(go.Scatter(name="cos(x, ∇θP L_P)", mode="lines+markers", marker=dict(size=4),
                                 line=dict(color="#9467bd", **line)), 1, 2)
        fig.add_trace(go.Heatmap(name="per layer", y=list(layer_names), zmin=-1, zmax=1, zmid=0,
                                 colorscale=LAYER_COLORSCALE,
                                 colorbar=dict(title="cos", len=0.3, y=0.5, x=0.43, thickness=12)), 2, 1)
        fig.add_trace(go.Scatter(name="‖θ_P − θ_D‖", mode="lines", line=dict(color="#8c564b", **line), showlegend=False), 3, 1)
        fig.add_trace(go.Scatter(name="val top-1", mode="lines+markers", line=dict(color="#17becf", **line),
                                 showlegend=False), 3, 2)
        for i in range(RESIDUAL_HISTORY):
            fig.add_trace(go.Scatter(mode="lines+markers", marker=dict(size=4), showlegend=False,
                                     line=dict(color=f"rgba(31,119,180,{0.25 + 0.75 * (i + 1) / RESIDUAL_HISTORY})")), 2, 2)
        for r, c, xt, yt in ((1, 1, "stage", "loss (nats)"), (1, 2, "stage", "cosine"),
                             (2, 1, "upper step (all stages)", ""), (2, 2, "solver iteration", "‖r‖ / ‖v‖"),
                             (3, 1, "stage", "L2 distance"), (3, 2, "stage", "val top-1")):
            fig.update_xaxes(title_text=xt, row=r, col=c)
            fig.update_yaxes(title_text=yt, row=r, col=c)
        for r, c in STAGE_PANELS[1:]:  # the four stage panels share one stage axis
            fig.update_xaxes(matches="x", row=r, col=c)
        fig.update_yaxes(range=[-1.05, 1.05], row=1, col=2)
        # plotly's own log ticks: one per decade over a wide range, 2 and 5 between over a short one
        # (the default solver's residuals stay within 0.6 … 1, where one tick per decade showed only "1")
        fig.update_yaxes(type="log", exponentformat="power", row=2, col=2)
        fig.update_xaxes(dtick=1, row=2, col=2)  # iterations are whole numbers (the default K = 1 got 0.2 steps)
        fig.update_yaxes(tickformat=".1%", row=3, col=2)
        # width: exports only; live, the widget takes the notebook's width (LiveFigure). The legend sits
        # between the title and the top panels with room for both.
        fig.update_layout(title=dict(text=title, y=0.985, yanchor="top"), height=880, width=1000,
                          margin=dict(t=100, b=40, l=60, r=20),
                          legend=dict(orientation="h", y=1.05, yanchor="bottom", x=0, font=dict(size=11)))
        self.figure = LiveFigure(fig, live=live)
        self.per_stage = lower_steps + upper_steps
        self.lower_steps = lower_steps
        self.heat_columns: list[list[float]] = []
        self.residuals: list[list[float]] = []

    def reconfigure(self, lower_steps: int, upper_steps: int) -> None:
        """New N_L, N_U (from the controls) for the positions of later records."""
        self.per_stage, self.lower_steps = lower_steps + upper_steps, lower_steps

    def mark_fork(self, stage: int, text: str) -> None:
        """A dashed line at ``stage`` on the four stage panels: the curves right of it belong to a fork
        (the notebook's controls) run under ``text``'s changes."""
        fig = self.figure.fig
        for i, (r, c) in enumerate(STAGE_PANELS):
            fig.add_vline(x=stage, line=dict(dash="dash", width=1, color="#555"), row=r, col=c,
                          annotation=dict(text=f"fork: {text}", font_size=10) if i == 0 else None)

    def update(self, rec: dict) -> None:
        f = self.figure
        kind = rec.get("kind")
        if kind == "lower":
            f.extend(T_PRETEXT, rec["stage"] - 1 + rec["step"] / self.per_stage, rec["pretext_loss"])
        elif kind == "upper":
            x = rec["stage"] - 1 + (self.lower_steps + rec["step"]) / self.per_stage
            f.extend(T_IMPLICIT, x, rec["implicit_loss"])
            f.extend(T_CLASSIC, x, rec["classic_loss"])
            f.extend(T_COS_CLASSIC, x, rec["cos_implicit_classic"])
            if "cos_implicit_pretext" in rec:
                f.extend(T_COS_PRETEXT, x, rec["cos_implicit_pretext"])
            self.heat_columns.append(rec["cos_implicit_classic_layers"])
            v = rec.get("v_norm") or 1.0
            self.residuals = (self.residuals + [[r / v for r in rec["solver_residuals"]]])[-RESIDUAL_HISTORY:]
        elif kind == "stage":
            f.extend(T_DIST, rec["stage"], rec["distance"])
            if "val_top1" in rec or "val_map" in rec:  # mAP on the accuracy axis for a multi-label task
                f.extend(T_ACC, rec["stage"], rec.get("val_top1", rec.get("val_map")))
        if kind in ("upper", "stage"):
            self._sync_arrays()
        if kind == "stage" and f.live:
            f.redraw()

    def _sync_arrays(self) -> None:
        """Heat map and residual traces are replaced whole, not extended point by point."""
        fig = self.figure.fig
        with fig.batch_update():
            if self.heat_columns:
                fig.data[T_HEAT].z = [list(row) for row in zip(*self.heat_columns)]
                fig.data[T_HEAT].x = list(range(1, len(self.heat_columns) + 1))
            offset = RESIDUAL_HISTORY - len(self.residuals)
            for i, res in enumerate(self.residuals):
                fig.data[T_RESIDUAL0 + offset + i].x = list(range(len(res)))
                fig.data[T_RESIDUAL0 + offset + i].y = res

    def finish(self, stem: str, figures_dir="figures") -> dict:
        self._sync_arrays()
        return self.figure.finish(stem, figures_dir)


def controls(trainer, dashboard: BisslDashboard, *, n_stages: int = 2):
    """ipywidgets to change λ, δ, γ, K, N_L, N_U and both learning rates, and run N more stages.

    A changed knob forks the run (:meth:`~bissl_kit.bissl.BisslTrainer.fork`): the folder so far keeps
    its stages with the config that produced them, and the run goes on in ``<out_dir>-fork<N>``, whose
    checkpoint records the parent folder, the stage it branched at and the changed fields; the status
    line says where the run now lives. With no knob changed the run continues in place: ``stages``,
    which only extends the horizon (the cosine schedules are re-planned over it), may change on resume.
    A bad value shows the error and runs nothing.
    """
    import ipywidgets as w

    from ..config import ConfigError

    c = trainer.cfg
    fields = {
        "lam": w.FloatLogSlider(value=c.lam, base=10, min=-5, max=1, description="λ"),
        "damping": w.FloatLogSlider(value=max(c.damping, 1e-3), base=10, min=-3, max=2, description="δ"),
        "gamma": w.FloatLogSlider(value=max(c.gamma, 1e-3), base=10, min=-3, max=1, description="γ"),
        "solver_iters": w.IntSlider(value=c.resolved_solver_iters, min=1, max=50, description="K (solver its)"),
        "lower_steps": w.IntSlider(value=c.lower_steps, min=0, max=50, description="N_L"),
        "upper_steps": w.IntSlider(value=c.upper_steps, min=0, max=20, description="N_U"),
        "lower_lr": w.FloatLogSlider(value=c.lower_lr, base=10, min=-3, max=1, description="lower lr"),
        "upper_lr": w.FloatLogSlider(value=c.upper_lr, base=10, min=-4, max=0, description="upper lr"),
    }
    # What each knob showed when the current config was set: a knob counts as changed only when the user
    # moved it, so that a slider that cannot show the config's value (δ = 0 on a log scale; K left to the
    # solver) does not fork the run by itself.
    shown = {k: wd.value for k, wd in fields.items()}
    style = {"description_width": "90px"}
    for widget in fields.values():
        widget.style = style
        widget.continuous_update = False
    n = w.BoundedIntText(value=n_stages, min=1, max=1000, description="stages", style=style)
    button = w.Button(description=f"run {n_stages} stages", button_style="primary", icon="play")
    status = w.HTML(value=f"<b>{trainer.stage}</b> stages done")
    out = w.Output(layout=w.Layout(max_height="120px", overflow="auto"))
    where = [""]  # the latest fork, kept on the status line below the stage count

    def show(line: str) -> None:
        status.value = line + (f"<br>{where[0]}" if where[0] else "")

    def label(_=None):
        button.description = f"run {n.value} stages"
    n.observe(label, "value")

    def on_click(_):
        changes = {k: wd.value for k, wd in fields.items() if wd.value != shown[k]}
        old = trainer.cfg
        try:
            new = old.replace(**changes, stages=max(old.stages, trainer.stage + n.value))
            if any(k not in type(new).resumable_fields() for k in changes):
                folder = trainer.fork(new)  # this folder keeps its stages; the rest goes to the fork's
                what = ", ".join(f"{fields[k].description} {_value(old, k):g} → {v:g}" for k, v in changes.items())
                where[0] = (f"forked to {folder} at stage {trainer.stage} ({what})" if folder is not None
                            else f"config changed at stage {trainer.stage} ({what}); in memory, not saved")
                dashboard.mark_fork(trainer.stage, what)
            else:
                trainer.continue_with(new)
        except Exception as e:  # a refused value (ConfigError), or a fork folder that cannot be written
            with out:
                print(f"not run: {e}" if isinstance(e, ConfigError) else f"not run: {type(e).__name__}: {e}")
            return
        shown.update({k: wd.value for k, wd in fields.items()})
        dashboard.reconfigure(trainer.cfg.lower_steps, trainer.upper_steps)
        show(f"<b>{trainer.stage}</b> stages done")
        button.disabled = True
        try:
            for rec in trainer.run(n.value):
                dashboard.update(rec)
                if rec.get("kind") == "stage":
                    show(f"<b>{trainer.stage}</b> stages done; val top-1 {rec.get('val_top1', float('nan')):.1%}")
        except Exception as e:  # shown in the panel; the checkpoint of the last finished stage is kept
            with out:
                print(f"stopped: {type(e).__name__}: {e}")
        finally:
            button.disabled = False
            dashboard.figure.redraw()

    button.on_click(on_click)
    grid = w.GridBox(list(fields.values()), layout=w.Layout(grid_template_columns="repeat(2, 380px)"))
    return w.VBox([grid, w.HBox([n, button, status]), out])


def _value(cfg, field: str):
    """A knob's field as the run uses it (K left to the solver is the solver's own)."""
    return cfg.resolved_solver_iters if field == "solver_iters" else getattr(cfg, field)
