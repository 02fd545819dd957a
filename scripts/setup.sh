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
if ! .venv/bin/python -c "import torch, torchvision, nvidia.dali, yaml, pytest" 2>/dev/null \
   || [ requirements.txt -nt .venv/.installed ] || [ requirements-test.txt -nt .venv/.installed ]; then
  echo "[setup] pip install -r requirements-test.txt"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
  touch .venv/.installed
fi
echo "[setup] ok: $(.venv/bin/python -c 'import torch, nvidia.dali as d; print("torch", torch.__version__, "dali", d.__version__)')"
