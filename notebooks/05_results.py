# %% [markdown]
# # 05 · Baseline vs BiSSL: the comparison
#
# Does the bilevel stage give a better backbone to fine-tune than the conventional pipeline? Every arm
# starts from **the same pretext checkpoint** (notebook 01) and is fine-tuned with the same protocol:
#
# * **baseline, compute-matched**: the pre-trained backbone after as many *extra pretext steps* as BiSSL's
#   lower level took (stages × N_L, same optimiser and schedule, no proximal term), the compute matching of
#   the paper's ICLR version (spec §3);
# * **baseline**: the pre-trained backbone as it is (the later versions' protocol; not compute-matched);
# * **BiSSL**: the lower backbone θ_P of notebook 02's run.
#
# For each arm the learning rate and the weight decay are chosen by **random search on val** (the same
# candidate pairs for every arm, so no arm is tuned harder), then the chosen values are run with several
# seeds, each evaluated **once on the test split**. Reported: each seed's test accuracy, the mean with its
# 95 % t-interval, and a **paired t-test** between arms (seed s of both arms shares the head
# initialisation, the batch order and the augmentations). The live plot shows each search trial's val
# top-1 against its learning rate.
#
# The demo defaults below are small (one task, few trials and seeds, short fine-tuning) so that the
# notebook runs in a couple of minutes on a laptop CPU; they reuse the runs of notebooks 01 and 02. The
# committed comparison (both embedded tasks, more trials and seeds, produced by `python -m bissl_kit
# compare`, command in `results/`) is shown at the end.

# %%
from pathlib import Path

from IPython.display import Image, Markdown, display

from bissl_kit.notebooks import NotebookParameters
from bissl_kit.compare import CompareConfig, run_comparison
from bissl_kit.reports import comparison_table, load_results, protocol_text
from bissl_kit.viz.compare import SearchMonitor, comparison_figure
from bissl_kit.viz.figures import export_figure, show_static

params = NotebookParameters(globals())

# %% tags=["parameters"]
# Parameters: any CompareConfig field may be set here or with papermill -p; unknown names are an error.
pretrain_checkpoint = "../runs/pretrain/checkpoint.pt"
tasks = ("digits",)                     # e.g. ("digits", "fashion_mnist:50"): 50 labelled images per class
bissl_runs = ("../runs/bissl",)         # one finished BiSSL run per task, started from pretrain_checkpoint
arms = ("baseline_matched", "bissl")    # add "baseline" for the un-matched baseline
trials = 3                              # search trials per arm (the paper: 100-200)
seeds = 3                               # final runs per arm (the paper: 10)
epochs = 10                             # fine-tuning epochs of every run (the paper: 400)
out_dir = "../runs/compare_demo"
figures_dir = "../runs/figures"         # git ignores runs/; `make figures` writes the committed ../figures
figure_stem = "05_demo_comparison"
# Notebook-only settings
live = True                             # live search plot in JupyterLab; headless runs set it to False
committed_results = "../results/comparison.json"
committed_figure = "../figures/05_comparison.png"  # made with the committed results (results/run_comparison.sh)

# %%
cfg = params.config(CompareConfig, extras=("live", "committed_results", "committed_figure"))
print(cfg.to_json())

# %% [markdown]
# ## Run
#
# Every run resumes from its own checkpoint, so re-running the notebook only does what is missing; a failed
# trial is recorded and the others go on.

# %%
monitor = SearchMonitor(cfg.tasks, cfg.arms, live=live)
results = run_comparison(cfg, on_run=monitor.update)
monitor.finish(f"{figure_stem}_search", figures_dir);

# %% [markdown]
# ## Result
#
# Test accuracy of each arm (mean ± half-width of the 95 % t-interval over seeds; n seeds), the values the
# search chose on val, and the frozen backbone's k-NN and linear-probe accuracy on test. Below: the paired
# differences. With few seeds the intervals are wide: a difference whose interval covers 0 is not
# evidence either way.

# %%
display(Markdown(comparison_table(results)))
display(Markdown("**Protocol.**\n\n" + protocol_text(results)))

# %%
figure = comparison_figure(results)  # run_comparison writes the text files; the figure is drawn here
show_static(figure, export_figure(figure, figure_stem, figures_dir).get("png"))

# %% [markdown]
# ## The committed comparison
#
# The comparison committed under `results/` (both embedded tasks, 12 search trials, 5 seeds), with the command that made it.
# The README quotes this table beside three BiSSL seeds on digits and the 4-trial search it replaced,
# whose lr choice sat at the edge of what it tried.

# %%
path = Path(committed_results)
if path.exists():
    committed = load_results(path)
    # 'seconds' times the invocation that wrote the file; a rerun only re-reads finished runs
    display(Markdown(f"Command: `{committed['command']}` (that invocation: {committed['seconds']:.0f} s; "
                     "finished runs are re-read, not redone)"))
    display(Markdown(comparison_table(committed)))
    display(Markdown("**Protocol.**\n\n" + protocol_text(committed)))
    if Path(committed_figure).exists():
        display(Image(filename=committed_figure))
else:
    print(f"no committed results at {path}")
