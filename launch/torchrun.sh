#!/usr/bin/env bash
# Training with torchrun: one process per GPU on this node, or one node of several.
#   launch/torchrun.sh [NUM_PROCS] [hydra overrides...]
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh 8 parallel=fsdp2 parallel.sp=4 ...
# NUM_PROCS defaults to the number of visible GPUs (1 without any). Every rank uses the same
# run directory: RUN_DIR (default outputs/torchrun-<time>) unless hydra.run.dir is given.
# torchrun is the one next to the Python that has stafinetune (launch/lib.sh: VENV, the
# active environment, the repository's .venv, PATH). When a rank stops on bad input, the
# script ends with that rank's one-line error and exit code 2 (after torchrun's report), and
# the run directory that start left empty is removed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
torchrun="$(stafinetune_tool torchrun)"
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then
  nproc="$1"
  shift
else
  python="$(stafinetune_tool python3)"
  nproc="$("$python" -c 'import torch; print(max(1, torch.cuda.device_count()))')"
fi
# NVLink SHARP multicast stays off: it is not needed here and can wedge shared hosts.
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
# on SIGTERM torchrun passes the signal on and gives the ranks this long to checkpoint
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}"
run_dir=(hydra.run.dir="${RUN_DIR:-outputs/torchrun-$(date +%Y%m%d-%H%M%S)}")
for arg in "$@"; do [[ "$arg" == hydra.run.dir=* ]] && run_dir=(); done  # the user's wins
if [[ -n "${NNODES:-}" && "${NNODES}" != 1 ]]; then
  rendezvous=(--nnodes "$NNODES" --node-rank "${NODE_RANK:?set NODE_RANK}"
              --master-addr "${MASTER_ADDR:?set MASTER_ADDR}" --master-port "${MASTER_PORT:-29500}")
else
  rendezvous=(--standalone)
fi
# torchrun's per-rank error files land here; the ranks' one-line errors beside them
logs="$(mktemp -d "${TMPDIR:-/tmp}/stafinetune-torchrun.XXXXXX")"
trap 'rm -rf "$logs"' EXIT
"$torchrun" --log-dir "$logs" "${rendezvous[@]}" --nproc-per-node "$nproc" \
  -m stafinetune train "${run_dir[@]}" "$@" &
child=$!
# torchrun passes SIGTERM on to the ranks, which checkpoint and stop (Ctrl-C included: a
# background process ignores SIGINT)
trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
trap 'kill -USR1 "$child" 2>/dev/null || true' USR1
status=0
while :; do  # wait returns early when a signal arrives: wait again until torchrun ends
  wait "$child" && status=0 || status=$?
  kill -0 "$child" 2>/dev/null || break
done
if [[ "$status" != 0 ]]; then
  errors="$(stafinetune_rank_errors "$logs")"
  if [[ -n "$errors" ]]; then
    stafinetune_prune_run_dir "${run_dir[@]}" "$@"
    echo "$errors" >&2
    exit 2
  fi
fi
exit "$status"
