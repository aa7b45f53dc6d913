# %% [markdown]
# # 03 · Fine-tuning
#
# The last stage of both pipelines: a backbone gets a **new random linear head** and every parameter is
# trained on the labelled downstream task (SGD with momentum and weight decay, cosine decay to 0.1 % of
# the learning rate, no warm-up: spec §2.6). The backbone is either
#
# * notebook 01's **pre-trained backbone** (`../runs/pretrain/checkpoint.pt`, the conventional pipeline), or
# * notebook 02's **BiSSL lower backbone θ_P** (`../runs/bissl/checkpoint.pt`). As in the official code, the
#   BiSSL upper model (θ_D with its head) is thrown away; θ_P is what BiSSL hands on.
#
# Before training, a weighted k-NN and a linear probe measure the *frozen* backbone. While it trains, the
# left panel shows the loss (and the learning rate), the right one val top-1/top-5 per epoch. At the end
# the reported model (the last epoch's by default) is evaluated **once on the test split**; the val split
# is the only one seen before that. One run with hand-set lr and weight decay is a look, not a result:
# notebook 05 searches both on val for every pipeline and compares them over seeds.

# %%
from bissl_kit.notebooks import NotebookParameters
from bissl_kit.backbones import load_backbone
from bissl_kit.downstream import frozen_metrics
from bissl_kit.finetune import FinetuneConfig, Finetuner
from bissl_kit.viz.finetune import FinetuneMonitor
from bissl_kit.viz.tables import markdown_table

params = NotebookParameters(globals())

# %% tags=["parameters"]
# Parameters: any FinetuneConfig field may be set here or with papermill -p; unknown names are an error.
backbone_checkpoint = "../runs/bissl/checkpoint.pt"  # BiSSL θ_P; the baseline: "../runs/pretrain/checkpoint.pt"
downstream = "digits"       # or "fashion_mnist" with labels_per_class (e.g. 50)
labels_per_class = None
epochs = 20                 # the paper fine-tunes for 400 epochs
lr = 0.05                   # SGD base learning rate (notebook 05 searches it on val)
weight_decay = 5e-4
batch_size = 256
select = "last"             # the reported model: "last" epoch or "best_val" epoch
seed = 0
out_dir = "../runs/finetune"
# Notebook-only settings
live = True                 # live plotly widget in JupyterLab; headless runs set it to False
figures_dir = "../runs/figures"  # git ignores runs/; `make figures` writes the committed ../figures

# %%
cfg = params.config(FinetuneConfig, extras=("live", "figures_dir"))
print(cfg.to_json())

# %% [markdown]
# ## The frozen backbone
#
# k-NN (the k = 20 nearest train images by cosine similarity vote with weight exp(s/T)) and a linear
# probe (a linear classifier on frozen features), both on the **val** split.

# %%
source = load_backbone(cfg.backbone_checkpoint)  # the backbone as it starts, before fine-tuning
tuner = Finetuner(cfg)
frozen = frozen_metrics(source.backbone, tuner.data, split="val")
print(f"backbone: {source.role} backbone of the {source.kind} checkpoint {source.path}")
print(f"k-NN          {frozen['knn']:.2%}   ({frozen['knn_protocol']})")
print(f"linear probe  {frozen['probe']:.2%}   ({frozen['probe_protocol']})" if frozen["probe"] is not None
      else frozen["probe_protocol"])

# %% [markdown]
# ## Fine-tune
#
# Re-running the notebook resumes a stopped run (and redraws its history) instead of starting over.

# %%
monitor = FinetuneMonitor(live=live, title=f"Fine-tuning the {source.kind} backbone on {tuner.data.task}")
for record in tuner.run(replay=True):
    monitor.update(record)
monitor.finish("03_finetune_curves", figures_dir)

# %% [markdown]
# ## Result
#
# The reported model on val and, once, on test. Every number carries its protocol.

# %%
res = tuner.result
rows = [{"split": "val", "top-1": res["val_top1"], "top-5": res["val_top5"], "protocol": res["protocol"]}]
if "test_top1" in res:
    rows.append({"split": "test", "top-1": res["test_top1"], "top-5": res["test_top5"], "protocol": res["test_protocol"]})
markdown_table(rows, ["split", "top-1", "top-5", "protocol"], formats={"top-1": ".2%", "top-5": ".2%"})

# %% [markdown]
# The fine-tuned model is in `runs/finetune/checkpoint.pt` (`bissl_kit.finetune.load_finetuned` returns
# the backbone, the head and the config). Next: **05 · the comparison** of both pipelines over seeds, with the
# learning rate and weight decay searched on val for each.
