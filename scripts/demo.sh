#!/usr/bin/env bash
# The main job on the embedded default, end to end on this machine:
# environment -> Fashion-MNIST (Debian package) and photo-crop datasets in the zip layout ->
# loader throughput of DALI vs torchvision on the same data and cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
[ -f data/fmnist/train.zip ] || $PY launch.py prepare fmnist --out data/fmnist
[ -f data/photos/train.zip ] || $PY launch.py prepare photos --out data/photos --n 2000
$PY launch.py profile --config configs/profile_simclr.yaml --out runs/profile_simclr "$@"
