# What run_comparison.sh and run_bissl_seeds.sh share, so that the BiSSL-seed runs repeat the committed
# comparison's settings exactly: one thread per process (a seed reproduces a CPU run only at a fixed
# thread count), niced, BiSSL at notebook 02's demo settings, and the search budget.
export OMP_NUM_THREADS=1
PY="nice -n 10 .venv/bin/python"
RUNS=${RUNS:-runs/comparison}
BISSL="--stages 6 --lower-steps 10 --upper-steps 4 --lower-batch-size 128 --upper-batch-size 128 --progress false"
SEARCH_BUDGET="--trials 12 --seeds 5 --epochs 10 --progress false"
