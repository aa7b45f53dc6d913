#!/bin/bash
# second sweep: flip_p=0 (first sweep's clear win) combined with one other change; seed 0, 300 steps
cd "$(dirname "$0")/../.." && source .venv/bin/activate && export OMP_NUM_THREADS=1
R="nice -n 5 python benchmarks/experiments/pretrain_knn.py train --seeds 0 --eval-at 300"
while pgrep -f "pretrain_knn.py train" >/dev/null; do sleep 5; done
$R --name noflip_crop05 --set flip_p=0.0 'crop_scale=[0.5,1.0]'
$R --name noflip_tau05 --set flip_p=0.0 temperature=0.5
$R --name noflip_byol --set flip_p=0.0 method='"byol"'
