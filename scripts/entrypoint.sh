#!/usr/bin/env bash
# Container entry point: `docker run ... fastinst <launch.py subcommand and options>`.
# One process per GPU on this node under torchrun; several nodes rendezvous at RDZV_ENDPOINT.
#   NPROC_PER_NODE  processes on this node (default: the GPUs torch sees, at least 1)
#   NNODES          nodes, or MIN:MAX for an elastic job (default 1)
#   RDZV_ENDPOINT   host:port of the rendezvous (required when NNODES != 1)
#   RDZV_ID         job id shared by the nodes (default fastinst)
#   MAX_RESTARTS    torchrun --max-restarts (default 0)
# With no arguments it prints launch.py's help.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -eq 0 ]; then exec python launch.py --help; fi
NPROC=${NPROC_PER_NODE:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
NNODES=${NNODES:-1}
if [ "$NNODES" = "1" ]; then
  exec torchrun --standalone --nproc_per_node="$NPROC" --max-restarts="${MAX_RESTARTS:-0}" launch.py "$@"
fi
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port (the same on every node) when NNODES=$NNODES}"
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" \
  --rdzv-id="${RDZV_ID:-fastinst}" --max-restarts="${MAX_RESTARTS:-0}" launch.py "$@"
