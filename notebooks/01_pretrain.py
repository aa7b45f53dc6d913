# %% [markdown]
# # 01 · Self-supervised pre-training
#
# BiSSL starts from a backbone pre-trained on a *pretext* task. Here that is **SimCLR** (or BYOL) on
# the Fashion-MNIST training images, labels unused, with the narrow ResNet-18 that trains on a laptop CPU
# in a few minutes. The paper pre-trains a ResNet-18 on STL10 (ICLR version) or a ResNet-50 on ImageNet
# (later versions) for 500–600 epochs; the `paper_augment`, `arch` and `width` parameters move towards
# that setting on a GPU.
#
# While it trains, the left panel shows the NT-Xent loss and the right one a **weighted k-NN probe** of
# the frozen backbone on a labelled downstream set (scikit-learn's digits by default): train-split
# features vote for the val-split images. Step 0 is the randomly initialised backbone, the control
# every later number is compared with.
#
# **BatchNorm statistics are part of that comparison.** In eval mode a BN layer normalises with the
# running statistics it holds. A random network has never estimated any (mean 0, variance 1: BN is the
# identity), so "as it is" it is an *un-normalised* random conv net, a pixel-like kernel that is strong
# on 8×8 digits; a trained one holds the average of its last few *augmented* batches. The monitor
# therefore re-estimates the statistics on a copy of each backbone, random or trained alike, over
# 5,120 fixed un-augmented pretext images (`knn_bn = "pretext"`, no downstream data), and also records
# the as-held number (`"running"`) so a change of protocol is never mistaken for a training gain.
#
# The checkpoint lands in `runs/pretrain/` and is what notebook 02 (the bilevel stage) starts from.
# Re-running the notebook resumes a stopped run instead of starting over.

# %%
from bissl_kit.notebooks import NotebookParameters
from bissl_kit.pretrain import KNN_BN_PROTOCOLS, Pretrainer, PretrainConfig, read_metrics
from bissl_kit.viz.figures import export_figure, show_static
from bissl_kit.viz.pretrain import PretrainMonitor, knn_comparison

params = NotebookParameters(globals())

# %% tags=["parameters"]
# Parameters: any PretrainConfig field may be set here or with papermill -p; unknown names are an error.
method = "simclr"           # "simclr" or "byol"
steps = 200                 # optimiser steps of 256 image pairs (≈0.9 Fashion-MNIST epochs; ≤ 4 min on 2 CPU cores)
image_size = 16             # Fashion-MNIST and digits resized to 16×16 (CPU budget)
temperature = 0.2           # NT-Xent τ (the paper uses 0.5 for 500-epoch runs)
batch_size = 256
lr = 1.2                    # LARS base learning rate
width = 16                  # narrow ResNet-18 (widths 16/32/64/128)
# Augmentation: the embedded chain has no flip (digits are chiral) and a low-resolution view
# (p 0.5, 6..12 px: the digits are 8×8 upscaled); flip_p, lowres_p, lowres_size override it.
knn_bn = "pretext"          # BN statistics of the k-NN features: "pretext" (re-estimated) or "running" (as held)
seed = 0
out_dir = "../runs/pretrain"
# Notebook-only settings
live = True                 # live plotly widget in JupyterLab; headless runs set it to False
figures_dir = "../runs/figures"  # git ignores runs/; `make figures` writes the committed ../figures

# %%
cfg = params.config(PretrainConfig, extras=("live", "figures_dir"))
print(cfg.to_json())

# %% [markdown]
# ## Train
#
# The cell below trains (or resumes) and streams each step into the plot. The progress bar shows the
# loss and learning rate (linear warm-up, then cosine decay to 0.1 % of the base rate).

# %%
trainer = Pretrainer(cfg)
monitor = PretrainMonitor(live=live, title=f"Pre-training: {cfg.method} on {cfg.pretext_dataset}, {cfg.arch} width {cfg.width}")
for record in trainer.run(replay=True):  # replay: a resumed run redraws its history
    monitor.update(record)
monitor.finish("01_pretrain_curves", figures_dir)

# %% [markdown]
# ## Did pre-training help?
#
# The k-NN probe of the pre-trained backbone against the same backbone at initialisation (step 0, same
# seed), under both BN protocols. Read the `pretext` pair: both networks normalised alike. The `running`
# pair compares an identity-BN random network with a trained one and is shown only so that nobody reads
# the change of protocol as a gain (or a loss) of training. All numbers come from the monitor set's
# **val** split; the test split is kept for the final comparison in notebook 05.

# %%
knn = [r for r in read_metrics(cfg.out_dir) if "knn" in r]
first, last = knn[0], knn[-1]
print(f"random init (step {first['step']}): {first['knn']:.2%}")
print(f"pre-trained (step {last['step']}): {last['knn']:.2%}")
print("protocol:", last["protocol"])
for bn, text in KNN_BN_PROTOCOLS.items():
    print(f"  {bn:>7} BN: random init {first['knn_by_bn'][bn]:.2%} → pre-trained {last['knn_by_bn'][bn]:.2%}  ({text})")
rows = [(f"{name}<br>{bn} BN", r["knn_by_bn"][bn]) for bn in KNN_BN_PROTOCOLS
        for name, r in (("random init", first), (f"{cfg.method} pre-trained", last))]
protocol = last["protocol"].replace(", " + KNN_BN_PROTOCOLS[cfg.knn_bn], "")
fig = knn_comparison(rows, f"{protocol}<br>pretext BN: {KNN_BN_PROTOCOLS['pretext']}",
                     "k-NN accuracy of the frozen backbone")
show_static(fig, export_figure(fig, "01_pretrain_knn", figures_dir).get("png"))

# %% [markdown]
# The checkpoint `runs/pretrain/checkpoint.pt` holds the config, the step, the backbone and the
# projector. Next: **02 · the bilevel stage**, which starts its two backbones θ_P and θ_D from it.
