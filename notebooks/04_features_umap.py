# %% [markdown]
# # 04 · Feature analysis: what BiSSL does to the backbone's downstream features
#
# The paper's second claim is qualitative: BiSSL "enhances the alignment of downstream features in the
# backbone prior to fine-tuning". No public code exists for it (spec §5). This notebook makes it
# **inspectable** (pictures) and **measurable** (numbers), stage by stage along the pipeline:
#
# | stage | backbone | from |
# |---|---|---|
# | random init | the pre-training run's initialisation (same seed) | the control |
# | pre-trained | notebook 01's backbone | `../runs/pretrain` |
# | BiSSL θ_P (lower) | the pretext backbone after the bilevel stage: **the one fine-tuning starts from** | `../runs/bissl` |
# | BiSSL θ_D (upper) | the downstream backbone of the bilevel stage (the official code discards it) | `../runs/bissl` |
# | fine-tuned | notebook 03's result (baseline or BiSSL, read from the checkpoint) | `../runs/finetune` |
#
# Stages whose checkpoint does not exist yet are skipped with a note; a path named in the parameters must exist.
#
# Every backbone is frozen (eval-mode BatchNorm, no augmentation). With `bn = "pretext"` (the default)
# every stage's BatchNorm statistics are first re-estimated, on a copy, over the same 5,120 un-augmented
# pretext images, as in notebook 01's k-NN monitor: a random network's statistics were never estimated
# (they are the identity), so comparing it as held with a trained one would compare two normalisations.
# `bn = "running"` uses each checkpoint's statistics as held. For each stage the **numbers** are a
# weighted k-NN and a linear probe (train split → eval split, the protocol of notebooks 01, 03 and 05) and
# the **silhouette** of the true classes in feature space: +1 tight, separated classes; 0 overlapping;
# negative, images closer to another class than to their own. The **pictures** are UMAP embeddings of the
# eval images. UMAP axes have no units, and distances between clusters in a UMAP picture are not
# measurements: the claim stands or falls with the numbers, the pictures show *where* it happens.

# %%
from bissl_kit.notebooks import NotebookParameters
from bissl_kit.features import FeaturesConfig, analyse, changed_predictions
from bissl_kit.viz.features import StageExplorer, metrics_figure, thumbnails_figure, umap_panels
from bissl_kit.viz.figures import export_figure, show_static
from bissl_kit.viz.tables import markdown_table

params = NotebookParameters(globals())

# %% tags=["parameters"]
# Parameters: any FeaturesConfig field may be set here or with papermill -p; unknown names are an error.
runs_dir = "../runs"             # "whatever exists" under runs/: pretrain, bissl, finetune (each checkpoint.pt)
pretrain_checkpoint = None       # or a path, which must then exist (likewise the next two)
bissl_checkpoint = None
finetune_checkpoints = None      # or a list of fine-tuning checkpoints, e.g. the seeds of notebook 05
stages = ["random", "pretrained", "bissl_lower", "bissl_upper", "finetuned"]
split = "val"                    # the images pictured and evaluated; "test" only for final numbers
n_neighbors = 15                 # UMAP: neighbourhood size
min_dist = 0.1                   # UMAP: how tightly points may pack
umap_fit = "aligned"             # "aligned" (one UMAP per stage, Procrustes-aligned), "pooled" or "reference"
bn = "pretext"                   # BatchNorm statistics: "pretext" (re-estimated alike for every stage) or "running"
seed = 0
# Notebook-only settings
live = True                      # interactive explorer in JupyterLab; headless runs set it to False
figures_dir = "../runs/figures"  # git ignores runs/; `make figures` writes the committed ../figures

# %%
cfg = params.config(FeaturesConfig, extras=("live", "figures_dir"))
print(cfg.to_json())

# %% [markdown]
# ## Features and numbers
#
# Loads every stage, extracts pooled features of the train and eval splits, and measures them. The
# first run in a fresh kernel spends ~10–30 s compiling UMAP (numba).

# %%
analysis = analyse(cfg)
print(analysis.protocol_text())
print("seconds:", {k: round(v, 1) for k, v in analysis.seconds.items()})
markdown_table(analysis.rows(), ["stage", "k-NN", "linear probe", "silhouette", "checkpoint"],
               formats={"k-NN": ".1%", "linear probe": ".1%", "silhouette": "+.3f"})

# %% [markdown]
# ## Pictures
#
# One panel per stage, coloured by the true class, on shared axes. With `umap_fit="aligned"` each panel
# is its own stage's UMAP, rotated, reflected and scaled (never bent) so the same images sit as close as
# possible to where they are in the pre-trained panel: follow a colour from panel to panel. Hover a point
# for its image index. Look for classes that the pre-trained backbone mixes and a later stage pulls apart,
# then check the silhouette and k-NN numbers above each panel.

# %%
panels = umap_panels(analysis)
paths = export_figure(panels, "04_features_umap", figures_dir)
panels.show() if live else show_static(panels, paths.get("png"))

# %%
numbers = metrics_figure(analysis)
paths = export_figure(numbers, "04_features_metrics", figures_dir)
numbers.show() if live else show_static(numbers, paths.get("png"))

# %% [markdown]
# ## Explore
#
# Switch the stage and the colouring (class; whether the k-NN gets the image right; each image's own
# silhouette). The plot changes in place. Select points with the lasso or box tool to see their images
# (caption: class, and → the k-NN's wrong answer). The kernel must be idle for the switches to work.

# %%
StageExplorer(analysis) if live else print("headless run: the explorer is shown only with live=True")

# %% [markdown]
# ## The images behind a change
#
# The eval images whose k-NN answer changes between the pre-trained backbone and BiSSL's θ_P, the
# backbone that fine-tuning starts from: fixed (wrong before, right after) and broken (the reverse). If BiSSL
# aligns the features with the downstream task, the first list is longer than the second.

# %%
keys = [s.key for s in analysis.stages]
if "pretrained" in keys and "bissl_lower" in keys:
    fixed, broken = changed_predictions(analysis, "pretrained", "bissl_lower")
    print(f"k-NN fixed by BiSSL θ_P: {len(fixed)} images; broken: {len(broken)} (of {len(analysis.data.eval_labels)})")
    names = analysis.data.class_names()
    before = analysis.stage("pretrained")
    after = analysis.stage("bissl_lower")
    for stem, idx, stage, what in (
        ("04_features_fixed", fixed, before, "Fixed by BiSSL θ_P — {} images the pre-trained k-NN got wrong"),
        ("04_features_broken", broken, after, "Broken by BiSSL θ_P — {} images the pre-trained k-NN got right")):
        captions = [f"{names[analysis.data.eval_labels[i]]} (k-NN: {names[stage.knn_pred[i]]})" for i in idx]
        gallery = thumbnails_figure(analysis, idx, captions=captions, title=what.format(len(idx)) +
                                    "<br><sup>caption: true class (the wrong k-NN answer)</sup>")
        show_static(gallery, export_figure(gallery, stem, figures_dir).get("png"))
else:
    print("needs both the pre-trained and the BiSSL stage; skipped")

# %% [markdown]
# The figures are in `figures_dir` (by default `runs/figures/04_features_*.{html,png}`; `make figures` writes
# the committed `figures/`). How to read the result: the claim is about
# **θ_P against pre-trained**, before any fine-tuning. Higher k-NN, probe and silhouette for θ_P mean its
# features already sort the downstream classes better; θ_D shows what the upper level learns with its
# labels, and the fine-tuned rows show how much of that fine-tuning would have found anyway.
# Next: **05 · the comparison** over seeds, with the fine-tuning hyper-parameters searched for every pipeline.
