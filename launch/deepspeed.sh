#!/usr/bin/env bash
# Training with the DeepSpeed launcher over the hosts of a hostfile ("host slots=8" lines).
#   launch/deepspeed.sh HOSTFILE [hydra overrides...]
#   launch/deepspeed.sh hostfile parallel=zero3 parallel.sp=4 model=wan2.1_t2v_14b model.path=...
# parallel=zero2|zero3 selects the DeepSpeed engine (any strategy runs under this launcher).
# The run directory must be on a filesystem every host sees (RUN_DIR, default
# outputs/deepspeed-<time>); the launcher's --local_rank argument is consumed by stafinetune.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
deepspeed="$(stafinetune_tool deepspeed)"  # next to stafinetune's Python (launch/lib.sh)
hostfile="${1:?usage: launch/deepspeed.sh HOSTFILE [overrides...]}"
shift
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
run_dir=(hydra.run.dir="${RUN_DIR:-outputs/deepspeed-$(date +%Y%m%d-%H%M%S)}")
for arg in "$@"; do [[ "$arg" == hydra.run.dir=* ]] && run_dir=(); done  # the user's wins
exec "$deepspeed" --hostfile "$hostfile" --module stafinetune train "${run_dir[@]}" "$@"
