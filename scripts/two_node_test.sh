#!/usr/bin/env bash
# Two "nodes" on this machine: one network namespace each, joined by a veth pair (node 0 at
# $SUBNET.1/24, node 1 at $SUBNET.2/24, no other interface but loopback, so no traffic leaves the
# machine), and a private mount namespace each with its own tmpfs on /dev/shm (data.cache=full
# keeps one copy per node there). Each node runs
#   torchrun --nnodes=2 --node-rank=i --nproc-per-node=$NPROC_PER_NODE --rdzv-backend=c10d
#            --rdzv-endpoint=$SUBNET.1:$PORT ...
# over gloo on the veth (GLOO_SOCKET_IFNAME); c10d gives group ranks in join order (torchrun says
# it ignores --node-rank), so global rank 0 may run on either node. Needs root (ip netns, unshare, mount).
#
#   scripts/two_node_test.sh SCRIPT [ARGS...]       e.g.
#   sudo scripts/two_node_test.sh launch.py train --config configs/x.yaml --out /tmp/run2n
#
# Environment: PYTHON (default .venv/bin/python), NPROC_PER_NODE (1), SUBNET (10.77.0), PORT
# (29400: each node has its own port space), LOG_DIR (node0.log, node1.log; default a temp dir),
# TIMEOUT_S (600, per node), JOIN_TIMEOUT_S (120, the rendezvous). Exit status: 0 when both
# nodes succeed, 77 when namespaces cannot be made here (not root, no ip/unshare, not
# permitted), otherwise the first failing node's status. Namespaces and veths are removed on exit.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
SUBNET=${SUBNET:-10.77.0}
PORT=${PORT:-29400}
TIMEOUT_S=${TIMEOUT_S:-600}
JOIN_TIMEOUT_S=${JOIN_TIMEOUT_S:-120}
LOG_DIR=${LOG_DIR:-}
TAG=$$                                   # unique names: parallel or leftover runs do not clash
NS=("fastinst-n0-$TAG" "fastinst-n1-$TAG")
VETH=("fi0-$TAG" "fi1-$TAG")            # <= 15 characters (Linux interface names)
ADDR=("$SUBNET.1" "$SUBNET.2")

say() { echo "two_node_test: $*" >&2; }
skip() { say "SKIP: $*"; exit 77; }

[ $# -ge 1 ] || { say "usage: $0 SCRIPT [ARGS...] (run under torchrun in each of the two nodes)"; exit 2; }
[ "$(id -u)" = 0 ] || skip "needs root to create network and mount namespaces (uid $(id -u))"
for tool in ip unshare mount timeout; do
  command -v "$tool" >/dev/null || skip "'$tool' not found"
done
[ -x "$PYTHON" ] || { say "no python at $PYTHON (set PYTHON, or run scripts/setup.sh)"; exit 2; }
if [ -n "$LOG_DIR" ]; then mkdir -p "$LOG_DIR" || exit 2; else LOG_DIR=$(mktemp -d /tmp/two_node.XXXXXX) || exit 2; fi

cleanup() {
  local ns pid
  for ns in "${NS[@]}"; do
    # every process still in our own namespace (nothing else can be in it), then the namespace;
    # the veth pair has both ends inside the namespaces and goes with them
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null; done
  done
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    [ -z "$(for ns in "${NS[@]}"; do ip netns pids "$ns" 2>/dev/null; done)" ] && break
    sleep 0.5
  done
  for ns in "${NS[@]}"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  return 0
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# ---------------------------------------------------------------- the two nodes
out=$(ip netns add "${NS[0]}" 2>&1) || skip "ip netns add is not permitted here: $out"
out=$(ip netns add "${NS[1]}" 2>&1) || skip "ip netns add is not permitted here: $out"
out=$(ip link add "${VETH[0]}" netns "${NS[0]}" type veth peer name "${VETH[1]}" netns "${NS[1]}" 2>&1) \
  || skip "cannot create a veth pair: $out"
for i in 0 1; do
  ip -n "${NS[$i]}" link set lo up || exit 1
  ip -n "${NS[$i]}" addr add "${ADDR[$i]}/24" dev "${VETH[$i]}" || exit 1
  ip -n "${NS[$i]}" link set "${VETH[$i]}" up || exit 1
done
out=$(ip netns exec "${NS[0]}" unshare --mount --propagation private \
      sh -c 'mount -t tmpfs tmpfs /dev/shm' 2>&1) || skip "cannot mount a private /dev/shm (unshare --mount): $out"
say "node 0: ${NS[0]} ${VETH[0]} ${ADDR[0]}; node 1: ${NS[1]} ${VETH[1]} ${ADDR[1]}; logs in $LOG_DIR"

# ---------------------------------------------------------------- torchrun in each node
pids=()
for i in 0 1; do
  # c10d rendezvous on node 0's veth address: is_host says which node serves the store (torch's
  # hostname match cannot tell, the nodes share a hostname); --local-addr makes MASTER_ADDR the
  # veth address of the node holding group rank 0, not the machine's hostname (which resolves to
  # an address unreachable from inside the namespaces).
  is_host=$([ "$i" = 0 ] && echo 1 || echo 0)
  ip netns exec "${NS[$i]}" unshare --mount --propagation private -- \
    env -u RANK -u WORLD_SIZE -u LOCAL_RANK -u MASTER_ADDR -u MASTER_PORT \
        GLOO_SOCKET_IFNAME="${VETH[$i]}" FASTINST_NODE="$i" \
    bash -c 'mount -t tmpfs -o size=50% tmpfs /dev/shm || exit 1
             echo "node $FASTINST_NODE: /dev/shm is $(stat -c %d /dev/shm) (private tmpfs), GLOO_SOCKET_IFNAME=$GLOO_SOCKET_IFNAME"
             exec "$@"' node"$i" \
    timeout -k 10 "$TIMEOUT_S" "$PYTHON" -m torch.distributed.run \
      --nnodes=2 --node-rank="$i" --nproc-per-node="$NPROC_PER_NODE" \
      --rdzv-backend=c10d --rdzv-endpoint="${ADDR[0]}:$PORT" --rdzv-id="two-node-$TAG" \
      --rdzv-conf="is_host=$is_host,join_timeout=$JOIN_TIMEOUT_S" --local-addr="${ADDR[$i]}" \
      "$@" >"$LOG_DIR/node$i.log" 2>&1 &
  pids+=($!)
done

# the first node to fail ends the run (the other would otherwise wait out its rendezvous or
# collective timeouts); cleanup stops whatever is left
rc=0
running=("${pids[@]}")
while [ "${#running[@]}" -gt 0 ]; do
  wait -n -p done_pid "${running[@]}"
  st=$?
  i=$([ "$done_pid" = "${pids[0]}" ] && echo 0 || echo 1)
  running=($(for p in "${running[@]}"; do [ "$p" = "$done_pid" ] || echo "$p"; done))
  if [ "$st" != 0 ]; then
    say "node $i failed (exit $st); its errors, then the last lines of $LOG_DIR/node$i.log:"
    grep -E "Error|error:|Timeout" "$LOG_DIR/node$i.log" | grep -v "frame #" | tail -n 5 >&2
    tail -n 20 "$LOG_DIR/node$i.log" >&2
    rc=$st
    break
  fi
done
[ "$rc" = 0 ] && say "both nodes finished; logs in $LOG_DIR"
exit "$rc"
