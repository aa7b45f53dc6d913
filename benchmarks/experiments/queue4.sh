#!/bin/bash
# fourth: the library's own Gaussian blur (AugmentSpec.blur_p/blur_sigma) instead of the low-res op
cd "$(dirname "$0")/../.." && source .venv/bin/activate && export OMP_NUM_THREADS=1
R="nice -n 5 python benchmarks/experiments/pretrain_knn.py train --eval-at 150 300"
while pgrep -f "queue3.sh" >/dev/null; do sleep 5; done
$R --seeds 0 --name noflip_blur --set flip_p=0.0 --aug blur_p=0.5 'blur_sigma=[0.1,1.0]'
