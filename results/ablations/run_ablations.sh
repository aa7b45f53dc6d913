#!/usr/bin/env bash
# The committed ablation on digits (issue 19, part 6): three sweeps, each point a comparison of the
# compute-matched baseline and BiSSL over R = 3 BiSSL replicates (stage seeds 0, 1, 2), BiSSL at notebook
# 02's demo settings, from the committed pretext checkpoint. Run after run_comparison.sh, with the same RUNS.
# The search is smaller than run_comparison.sh's (4 trials and 3 fine-tuning seeds of 10 epochs, not 12
# and 5): the grid's 24 BiSSL runs with 12 + 4 fine-tunes per arm would take about three hours on the
# 2-core machine. The trials are a prefix of the comparison's (candidate i depends on (seed, i) only).
#   (i)   λ ∈ {1e-3, 1e-2, 1e-1, 1}
#   (ii)  the implicit term: x = v (no solve), MINRES-1 (the default), MINRES-5, the official layerwise-5
#   (iii) γ ∈ {0.01, 1}
# The sweeps share one folder of runs (--shared-dir): points that are the same BiSSL config (λ = 1e-3,
# MINRES-1 and γ = 0.01 are all the default) are run once, and every matched continuation (it depends only
# on the lower level and the seed) and its search once for all points. Everything resumes.
# EXECUTOR=ray fans the runs out over the cores (same numbers; one thread per run either way).
set -euo pipefail
source "$(dirname "$0")/../settings.sh"  # PY, RUNS, BISSL
SEARCH_BUDGET=${ABLATION_BUDGET:-"--trials 4 --seeds 3 --epochs 10 --progress false"}
EXECUTOR=${EXECUTOR:-sequential}
R=${R:-3}
COMMON="--pretrain-checkpoint $RUNS/pretrain/checkpoint.pt --tasks digits --bissl-runs $RUNS/bissl_digits
        --bissl-replicates $R --arms baseline_matched bissl $SEARCH_BUDGET --shared-dir $RUNS/ablations/shared
        --executor $EXECUTOR --job-threads 1 --figures-dir figures"

# the BiSSL template: the committed comparison's digits run (seed 0), as run_comparison.sh makes it
$PY -m bissl_kit bissl --pretrain-checkpoint $RUNS/pretrain/checkpoint.pt --downstream digits \
    --out-dir $RUNS/bissl_digits $BISSL

$PY -m bissl_kit sweep $COMMON --field lam --values 1e-3 1e-2 1e-1 1 \
    --out-dir $RUNS/ablations/lam --results-dir results/ablations/lam --sweep-stem 06_ablation_lam
$PY -m bissl_kit sweep $COMMON \
    --points "x=v:solver=none" "MINRES-1:solver=minres,solver_iters=1" \
             "MINRES-5:solver=minres,solver_iters=5,solver_rtol=none" \
             "layerwise-5:solver=layerwise,solver_iters=5,solver_rtol=none" \
    --out-dir $RUNS/ablations/solver --results-dir results/ablations/solver --sweep-stem 06_ablation_solver
$PY -m bissl_kit sweep $COMMON --field gamma --values 0.01 1 \
    --out-dir $RUNS/ablations/gamma --results-dir results/ablations/gamma --sweep-stem 06_ablation_gamma
