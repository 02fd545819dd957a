#!/usr/bin/env bash
# Prepare, on this networked CPU machine, what the GPU suite carries to the GPU host (no network
# there, Python 3.12, torch 2.11, no DALI). Writes the git-ignored folder gpu_carry/:
#   gpu_carry/dali/part_NN   DALI and what its JPEG decoding needs, for CPython 3.12 on
#                            manylinux x86_64, as one tar cut into <= 60 MiB parts
#   gpu_carry/data/photos    ImageNet-sized crops of real photographs, <= 25 MiB (loader tests)
#   gpu_carry/data/fmnist    the Fashion-MNIST IDX files (60k train / 10k test, ~31 MB)
# benchmarks/gpu/README.md says how to move them and run the suite.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=gpu_carry
PART_MIB=60
bash scripts/setup.sh >/dev/null
PY=.venv/bin/python
# Versions from requirements-lock.txt, so the GPU host runs the DALI the tests ran here. Left out
# (checked below): nvidia-libnvcomp-cu13 (DALI dlopens it only for its inflate operator),
# nvidia-nvjpeg2k-cu13 and nvidia-nvtiff-cu13 (JPEG 2000 and TIFF codecs); six, packaging, numpy and
# typing_extensions are in the GPU host's image (/work/.library/device/KINDS.md).
WHEELS=(nvidia-dali-cuda130 nvidia-nvimgcodec-cu13 nvidia-nvjpeg astunparse gast optree makefun libcst nvtx)
pins=()
for w in "${WHEELS[@]}"; do
  pin=$(grep -i "^${w}==" requirements-lock.txt || true)
  [ -n "$pin" ] || { echo "prepare: $w is not in requirements-lock.txt" >&2; exit 1; }
  pins+=("$pin")
done
rm -rf "$OUT/wheels" "$OUT/dali" && mkdir -p "$OUT/wheels" "$OUT/dali" "$OUT/data"
echo "[prepare] pip download (Python 3.12, manylinux x86_64): ${pins[*]}"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$OUT/wheels" "${pins[@]}" 2>&1 \
  | grep -v "^WARNING: Location" || true
n=$(ls "$OUT"/wheels/*.whl | wc -l)
[ "$n" -eq "${#WHEELS[@]}" ] || { echo "prepare: expected ${#WHEELS[@]} wheels, got $n" >&2; exit 1; }
# The check: in a Python 3.12 venv holding only these wheels plus what the GPU host's image has
# (numpy, six, packaging, pillow, typing_extensions), DALI imports and decodes real JPEGs on the CPU to PIL's
# pixels ('mixed' decoding needs the GPU host: the suite's GPU tests check it there).
PY312=${PYTHON312:-}
if [ -z "$PY312" ]; then
  for c in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if "$c" -c "import sys" >/dev/null 2>&1; then PY312=$c; break; fi
  done
fi
if [ -n "$PY312" ]; then
  venv=$(mktemp -d)
  "$PY312" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "$OUT"/wheels/*.whl 2>&1 | grep -v "^WARNING: Location" || true
  "$venv/bin/python" -m pip install -q --disable-pip-version-check numpy six packaging pillow typing_extensions 2>&1 | grep -v "^WARNING: Location" || true
  "$venv/bin/python" benchmarks/gpu/check_dali.py /usr/share/backgrounds/mate/nature
  rm -rf "$venv"
else
  echo "[prepare] WARNING: no python3.12 here (set PYTHON312): the DALI wheel subset was not checked" >&2
fi
tar -C "$OUT/wheels" -cf "$OUT/dali.tar" .
split -b "${PART_MIB}M" -d -a 2 "$OUT/dali.tar" "$OUT/dali/part_"
rm "$OUT/dali.tar"
# Data: photos (sized to stay under 25 MiB) and the IDX files as the Debian package ships them.
rm -rf "$OUT/data/photos" "$OUT/data/fmnist"
"$PY" launch.py prepare photos --out "$OUT/data/photos" --n 960 --val 64 >/dev/null
mkdir -p "$OUT/data/fmnist" && cp /usr/share/datasets/fashion-mnist/*.gz "$OUT/data/fmnist/"
size_kib=$(du -sk "$OUT/data/photos" | cut -f1)
[ "$size_kib" -le $((25 * 1024)) ] || { echo "prepare: photos are ${size_kib} KiB > 25 MiB" >&2; exit 1; }
echo "[prepare] $OUT/dali: $(ls "$OUT/dali" | wc -l) parts of <= ${PART_MIB} MiB ($(du -sh "$OUT/dali" | cut -f1)); \
$OUT/data: photos $(du -sh "$OUT/data/photos" | cut -f1), fmnist $(du -sh "$OUT/data/fmnist" | cut -f1)"
ls -l "$OUT/dali"
