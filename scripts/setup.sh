#!/usr/bin/env bash
# Build the environment on a fresh Debian machine: system data packages + a virtualenv in .venv.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=()
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
[ -d /usr/share/backgrounds/mate/nature ] || need_apt+=(mate-backgrounds)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "[setup] apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
# requirements-lock.txt pins every package, transitive ones included (scripts/lock.sh writes it
# from requirements-test.txt), so CI and every new machine get the same versions. --no-deps: only
# what the lock names is installed; pip check then fails if the lock misses a dependency.
if ! .venv/bin/python -c "import torch, torchvision, nvidia.dali, yaml, pytest" 2>/dev/null \
   || ! cmp -s requirements-lock.txt .venv/.installed; then
  echo "[setup] pip install --no-deps -r requirements-lock.txt"
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-lock.txt
  .venv/bin/python -m pip check --disable-pip-version-check
  cp requirements-lock.txt .venv/.installed
fi
echo "[setup] ok: $(.venv/bin/python -c 'import torch, nvidia.dali as d; print("torch", torch.__version__, "dali", d.__version__)')"
