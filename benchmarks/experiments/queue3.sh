#!/bin/bash
# third sweep: flip_p=0 + low-resolution augmentation, two seeds
cd "$(dirname "$0")/../.." && source .venv/bin/activate && export OMP_NUM_THREADS=1
R="nice -n 5 python benchmarks/experiments/pretrain_knn.py train --eval-at 150 300"
while pgrep -f "pretrain_knn.py train" >/dev/null; do sleep 5; done
$R --seeds 0 --name noflip_lowres --set flip_p=0.0 --lowres '{"p":0.5,"lo":6,"hi":12}'
$R --seeds 1 --name noflip_lowres --set flip_p=0.0 --lowres '{"p":0.5,"lo":6,"hi":12}'
