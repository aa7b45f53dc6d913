#!/bin/bash
# first sweep, seed 0, 300 steps, one run at a time (shared 2-core machine)
cd "$(dirname "$0")/../.." && source .venv/bin/activate && export OMP_NUM_THREADS=1
R="nice -n 5 python benchmarks/experiments/pretrain_knn.py train --seeds 0 --eval-at 150 300"
while pgrep -f "pretrain_knn.py train --name base " >/dev/null; do sleep 5; done
$R --name noflip --set flip_p=0.0
$R --name lowres --lowres '{"p":0.5,"lo":6,"hi":12}'
$R --name tau05 --set temperature=0.5
$R --name crop05 --set 'crop_scale=[0.5,1.0]'
$R --name byol --set method='"byol"'
