#!/usr/bin/env bash
# The main job on the embedded default, end to end on this machine (CPU, ~10 min on 2 cores):
# environment -> Fashion-MNIST from the Debian package (first 10k train / 2k val images) in
# PIC's zip layout -> NPID pretraining (ResNet-18, DALI CPU pipeline, full softmax over the
# memory bank) -> weighted kNN top-1 of the random-init and the trained network.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
[ -f data/fmnist_10k/val.zip ] || $PY launch.py prepare fmnist --out data/fmnist_10k --limit 10000 --limit-val 2000
$PY launch.py train --config configs/npid_fmnist.yaml --out runs/npid_fmnist --resume auto "$@"
