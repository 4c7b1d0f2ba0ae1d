#!/usr/bin/env bash
# Training with `accelerate launch` (accelerate only starts the processes; the strategy is
# still parallel=ddp|fsdp2|zero2|zero3).
#   launch/accelerate.sh CONFIG_YAML [hydra overrides...]
#   launch/accelerate.sh launch/accelerate/multi_gpu.yaml parallel=fsdp2
#   launch/accelerate.sh launch/accelerate/multi_node.yaml --machine_rank 1 parallel=zero3
# Options before the first override that start with -- go to accelerate (e.g. --machine_rank).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
accelerate="$(stafinetune_tool accelerate)"  # next to stafinetune's Python (launch/lib.sh)
config="${1:?usage: launch/accelerate.sh CONFIG_YAML [--accelerate-option value ...] [overrides...]}"
shift
accelerate_args=()
while [[ "${1:-}" == --* ]]; do
  accelerate_args+=("$1" "$2")
  shift 2
done
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
run_dir=(hydra.run.dir="${RUN_DIR:-outputs/accelerate-$(date +%Y%m%d-%H%M%S)}")
for arg in "$@"; do [[ "$arg" == hydra.run.dir=* ]] && run_dir=(); done  # the user's wins
exec "$accelerate" launch --config_file "$config" "${accelerate_args[@]}" --module stafinetune train \
  "${run_dir[@]}" "$@"
