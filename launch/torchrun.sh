#!/usr/bin/env bash
# Data-parallel training on one node with torchrun: one process per GPU.
#   launch/torchrun.sh [NUM_PROCS] [hydra overrides...]
# e.g. launch/torchrun.sh 8 model=wan2.1_t2v_1.3b model.path=/ckpt/Wan2.1-T2V-1.3B-Diffusers data=folder data.manifest=/data/clips.jsonl
set -euo pipefail
nproc="${1:-$(python3 -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
shift || true
# NVLink SHARP multicast stays off: it is not needed for all-reduce and can wedge shared hosts.
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
exec torchrun --standalone --nproc-per-node "$nproc" -m stafinetune.train "$@"
