#!/usr/bin/env bash
# The committed comparison (results/comparison.{json,csv,md}, figures/05_comparison.png), exactly as it was
# run: from the repository root, on the 2-core CPU machine, one thread per process, niced. The two tasks'
# chains run side by side; the last command re-reads every finished run and writes the combined results.
# Every stage resumes, so running this again only re-reads finished runs and redoes what is missing.
# Everything lives under $RUNS, so that runs of older defaults elsewhere in runs/ are never mixed in.
set -euo pipefail
source "$(dirname "$0")/settings.sh"  # PY, RUNS, BISSL, SEARCH_BUDGET
SEARCH="$SEARCH_BUDGET --out-dir $RUNS/compare"

# 1. The shared pretext checkpoint: the embedded default pre-training (notebook 01's defaults; a finished
#    run in $RUNS/pretrain is only re-read).
$PY -m bissl_kit pretrain --out-dir $RUNS/pretrain --progress false

# 2. Per task: a BiSSL run from that checkpoint (the embedded preset, i.e. our fast mode, at notebook 02's
#    demo settings), then the search and the seeds of the compute-matched baseline and of BiSSL.
chain() {  # task, BiSSL options, BiSSL run directory
    $PY -m bissl_kit bissl --pretrain-checkpoint $RUNS/pretrain/checkpoint.pt $2 --out-dir "$3" $BISSL
    $PY -m bissl_kit compare --pretrain-checkpoint $RUNS/pretrain/checkpoint.pt --tasks "$1" --bissl-runs "$3" \
        --arms bissl baseline_matched $SEARCH --results-dir "$RUNS/compare/partial_${1/:/_}"
}
chain digits "--downstream digits" $RUNS/bissl_digits &
chain fashion_mnist:50 "--downstream fashion_mnist --labels-per-class 50" $RUNS/bissl_fashion_mnist_50 &
wait

# 3. The combined results.
$PY -m bissl_kit compare --pretrain-checkpoint $RUNS/pretrain/checkpoint.pt \
    --tasks digits fashion_mnist:50 --bissl-runs $RUNS/bissl_digits $RUNS/bissl_fashion_mnist_50 \
    --arms baseline_matched bissl $SEARCH --results-dir results --figures-dir figures
