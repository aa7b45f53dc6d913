# %% [markdown]
# # 02 · The bilevel stage (BiSSL)
#
# BiSSL inserts a bilevel stage between pre-training and fine-tuning. Two copies of the pre-trained
# backbone start from notebook 01's checkpoint:
#
# * **lower level** — θ_P (with the projector φ_P) keeps training on the pretext task, pulled towards the
#   downstream backbone by (λ/2)‖θ_P − θ_D‖²;
# * **upper level** — θ_D (with a linear head φ_D) trains on the downstream task. Its gradient has two parts:
#   the *classic* ∇θD L_D(θ_D, φ_D), weighted by γ, and the *implicit* part: how the downstream loss of the
#   **lower** backbone changes when θ_D moves, x = (I + H/(λ+δ))⁻¹ ∇θP L_D(θ_P, φ_D), solved iteratively
#   (conjugate gradient in the official code) on Hessian-vector products of the pretext loss.
#
# Each stage runs N_L lower steps, then N_U upper steps, then evaluates (θ_D, φ_D) on the val split. The
# **lower** backbone θ_P is the stage's result: notebook 03 fine-tunes it.
#
# What to look at in the dashboard:
# * **alignment** — cos(x, ∇θD L_D) near 1 means the implicit hypergradient points where plain fine-tuning
#   would. On the paper's toy the solve is close to x ≈ v (spec §1.4); on a trained backbone it need not be:
#   A = I + H/(λ+δ) can be indefinite (its spectrum is measured by `benchmarks/hypergradient.py`).
#   cos(x, ∇θP L_P) tells whether the downstream
#   and the pretext task pull θ_P the same way (> 0) or against each other (< 0). The heat map shows the first
#   cosine per layer and upper step.
# * **solver residuals** — ‖v − Ax‖/‖v‖ of each upper step's solve. The official "layerwise" recursion's x
#   can end farther from the solution than x = 0 on an indefinite A. Our default, one MINRES iteration
#   (x = αv with the best α), can never do worse than x = 0; more iterations (`solver_iters`) reduce the
#   residual, slowly on an indefinite A. The measured errors and speeds of each solver are in
#   `docs/benchmarks.md` (made by `benchmarks/stage.py`).
# * **‖θ_P − θ_D‖** — how far the proximal term lets the two backbones drift apart.
#
# `BisslConfig.embedded()` is our default mode (one MINRES iteration per upper step, gradient graph built
# once per stage, BatchNorm statistics not drifting; its speed-up over the official stage is measured in
# `docs/benchmarks.md`);
# `paper_mode = True` runs the official algorithm exactly.
# After the run, the controls below the dashboard change λ, δ, γ, K, N_L, N_U and the learning rates and run
# more stages; the kernel must be idle for the button to work.

# %%
from bissl_kit.notebooks import NotebookParameters
from bissl_kit.bissl import BisslConfig, build_trainer
from bissl_kit.viz.bilevel import BisslDashboard, controls

params = NotebookParameters(globals())

# %% tags=["parameters"]
# Parameters: any BisslConfig field may be set here or with papermill -p; unknown names are an error.
pretrain_checkpoint = "../runs/pretrain/checkpoint.pt"
downstream = "digits"
stages = 6
lower_steps = 10
upper_steps = 4
lower_batch_size = 128
upper_batch_size = 128
gamma = 0.01
seed = 0
out_dir = "../runs/bissl"
# Notebook-only settings
paper_mode = False          # True: the official algorithm (layerwise CG, recompute, per-view forwards, BN drift, NaN -> 0)
live = True                 # live dashboard in JupyterLab; headless runs set it to False
figures_dir = "../runs/figures"  # git ignores runs/; `make figures` writes the committed ../figures

# %%
options = params.options("paper_mode", "live", "figures_dir")  # validated like config fields
cfg = BisslConfig.embedded(paper_mode=options.paper_mode, **params.fields("paper_mode", "live", "figures_dir"))
print(cfg.to_json())

# %% [markdown]
# ## Run
#
# Head warm-up first (a linear head on the frozen θ_D), then the stages. The dashboard updates while it runs.

# %%
trainer = build_trainer(cfg)
mode = "paper mode" if paper_mode else "fast mode"
dashboard = BisslDashboard(live=live, layer_names=[name for name, _ in trainer.groups],
                           lower_steps=cfg.lower_steps, upper_steps=trainer.upper_steps,
                           title=f"BiSSL on {cfg.downstream} ({mode}): λ={cfg.lam:g}, δ={cfg.damping:g}, "
                                 f"γ={cfg.gamma:g}, K={cfg.resolved_solver_iters}")
for record in trainer.run(replay=True):  # replay: a resumed run redraws its history
    dashboard.update(record)
dashboard.finish("02_bilevel_dashboard", figures_dir)

# %% [markdown]
# ## Per stage
#
# Val top-1/top-5 of the upper model (θ_D, φ_D) after each stage (stage 0: after the head warm-up), with the
# mean losses and the distance between the backbones. Val only: the test split is for notebook 05.

# %%
from bissl_kit.viz.tables import markdown_table
columns = ["stage", "val_top1", "val_top5", "pretext_loss", "implicit_loss", "classic_loss", "distance", "seconds"]
markdown_table(trainer.history, columns, formats={c: ".4g" for c in columns[1:]})

# %% [markdown]
# ## Explore
#
# Change the bilevel knobs and run more stages; the dashboard above keeps growing. A changed knob **forks**
# the run: `out_dir` keeps the stages run so far with the config that produced them (so this notebook, run
# again, resumes it), and the run goes on in `<out_dir>-fork1`, whose checkpoint records the folder and the
# stage it branched from; the status line says where the run now lives, and a dashed line marks the fork.
# With no knob changed, more stages continue in place. A value out of range is refused with the allowed
# range and nothing is run.

# %%
controls(trainer, dashboard) if live else print("headless run: controls are shown only with live=True")

# %% [markdown]
# The lower backbone θ_P is saved in `runs/bissl/checkpoint.pt` after every stage (atomically; a
# stopped run resumes from the last finished stage), and a fork's in its own folder: notebook 03 fine-tunes
# whichever `backbone_checkpoint` names. Next: **03 · fine-tuning**.
