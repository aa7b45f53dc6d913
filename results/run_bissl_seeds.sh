#!/usr/bin/env bash
# How much of the committed digits result is the one BiSSL run? The same comparison as
# run_comparison.sh's digits chain, repeated for BiSSL stage seeds 1 and 2 (seed 0 is the committed
# run), from the same pretext checkpoint and with the same search candidates and fine-tuning seeds.
# Run after run_comparison.sh, with the same RUNS (it reads $RUNS/pretrain); writes
# results/bissl_seeds/seed_S/comparison.*
set -euo pipefail
source "$(dirname "$0")/settings.sh"  # PY, RUNS, BISSL, SEARCH_BUDGET

one() {  # BiSSL stage seed
    $PY -m bissl_kit bissl --pretrain-checkpoint $RUNS/pretrain/checkpoint.pt --downstream digits --seed "$1" \
        --out-dir "$RUNS/bissl_digits_seed$1" $BISSL
    $PY -m bissl_kit compare --pretrain-checkpoint $RUNS/pretrain/checkpoint.pt --tasks digits \
        --bissl-runs "$RUNS/bissl_digits_seed$1" --arms baseline_matched bissl $SEARCH_BUDGET \
        --out-dir "$RUNS/compare_bissl_seed$1" --results-dir "results/bissl_seeds/seed_$1"
}
one 1 &
one 2 &
wait
