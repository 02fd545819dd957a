#!/usr/bin/env bash
# The GPU suite in one command (at most 9 min wall on the GPU host): six parts in order, each
# under its own time limit and each writing OUTDIR/<part>.json as it finishes; the summary
# table (OUTDIR/summary.md, .json) is rewritten after every part.
#   bash benchmarks/gpu/run.sh OUTDIR                  on the GPU host (benchmarks/gpu/README.md)
#   bash benchmarks/gpu/run.sh --bundle DEST OUTDIR    also, after every part, DEST/summary.md,
#        DEST/summary.json and DEST/suite.tar.gz (every part's JSON, table, log, chart and
#        metrics): three files, which is what the device tool's $OUT can bring back
#   bash benchmarks/gpu/run.sh --smoke OUTDIR          here: the same entry points on the CPU, toy sizes
# A part that fails or runs out of time is reported and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/../.."
SMOKE="" BUNDLE=""
while [ $# -gt 1 ]; do
  case "$1" in
    --smoke) SMOKE="--smoke"; shift ;;
    --bundle) BUNDLE=$2; shift 2 ;;
    *) break ;;
  esac
done
OUT=${1:?usage: run.sh [--smoke] [--bundle DEST] OUTDIR}
mkdir -p "$OUT" ${BUNDLE:+"$BUNDLE"}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -n "$SMOKE" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
# Seconds per part on the GPU host, 540 in all: the device tool's per-call limit is 600 s with
# DALI's install included. The smoke run's toy sizes take a fraction of these.
declare -A LIMIT=([gpu_tests]=60 [loader]=110 [loader_aug]=35 [step_time]=80 [end_to_end]=45 [compile]=60 [fmnist]=150)

bundle() {
  "$PY" benchmarks/gpu/suite.py --out "$OUT" --summary > /dev/null
  [ -n "$BUNDLE" ] || return 0
  cp "$OUT/summary.md" "$OUT/summary.json" "$BUNDLE/"
  (cd "$OUT" && find . -maxdepth 3 -type f \( -name '*.json' -o -name '*.md' -o -name '*.log' -o -name '*.png' \
      -o -name '*.jsonl' -o -name '*.xml' -o -name '*.yaml' \) -not -path '*/checkpoints/*' -not -path './smoke_data/*' \
      | sort | tar -czf "$BUNDLE/suite.tar.gz.tmp" -T -) && mv "$BUNDLE/suite.tar.gz.tmp" "$BUNDLE/suite.tar.gz"
}

status=0
for part in gpu_tests loader loader_aug step_time end_to_end compile fmnist; do
  t0=$(date +%s)
  timeout --signal=INT --kill-after=10 "${LIMIT[$part]}" "$PY" benchmarks/gpu/suite.py $SMOKE --part "$part" --out "$OUT" \
    > "$OUT/$part.log" 2>&1
  rc=$?
  echo "[run] $part: exit $rc after $(( $(date +%s) - t0 ))s (log: $OUT/$part.log)"
  if [ $rc -ne 0 ]; then status=1; tail -5 "$OUT/$part.log"; fi
  bundle
done
cat "$OUT/summary.md"
exit $status
