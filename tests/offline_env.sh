#!/usr/bin/env bash
# Run the test suite on a GPU machine that has torch but no package registry.
#
# The GPU machines we test on (Python 3.12, torch 2.11 + CUDA, triton, transformers, accelerate,
# peft, opencv) lack hydra, omegaconf, diffusers, decord, av, wandb, deepspeed and datasets.
# This script fetches them here as Python 3.12 manylinux wheels and installs them there, so
# the whole suite runs in one process on the GPU:
#
#   tests/offline_env.sh download .whl          # here (with pip access): wheels into .whl/{a,b,c}
#   tests/offline_env.sh install .whl/a ...     # there: install into $SITE (default /root/site)
#   PYTHONPATH=$SITE:. python3 -m pytest -q     # there
#
# The wheels come in parts of at most ~55 MB (a: the framework's core and video I/O; b: wandb,
# deepspeed, datasets; c: pyarrow) for machines that take a limited upload per call: install
# each part as it arrives; the target folder keeps what earlier parts put there.
set -euo pipefail

PY_TAG=(--python-version 3.12 --implementation cp --only-binary=:all: --no-deps
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform manylinux2010_x86_64 --platform manylinux1_x86_64 --platform any)
PART_A=(hydra-core==1.3.2 omegaconf==2.3.0 diffusers==0.42.1 av==18.1.1 decord==0.6.0
        vmaf-torch==1.1.0 yuvio==1.6)
PART_A_SDIST=(antlr4-python3-runtime==4.9.3)
PART_B=(wandb==0.18.7 docker-pycreds==0.4.0 gitpython==3.1.45 gitdb==4.0.12 smmap==5.0.2
        sentry-sdk==2.35.0 setproctitle==1.3.6 hjson==3.1.0 py-cpuinfo==9.0.0 msgpack==1.1.1
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==3.5.0)
PART_B_SDIST=(deepspeed==0.19.8)
PART_C=(pyarrow==26.0.1)

download() {
  local dest="$1"
  mkdir -p "$dest/a" "$dest/b" "$dest/c"
  python3 -m pip download -q "${PY_TAG[@]}" -d "$dest/a" "${PART_A[@]}"
  python3 -m pip wheel -q --no-deps -w "$dest/a" "${PART_A_SDIST[@]}"
  python3 -m pip download -q "${PY_TAG[@]}" -d "$dest/b" "${PART_B[@]}"
  DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w "$dest/b" "${PART_B_SDIST[@]}"
  python3 -m pip download -q "${PY_TAG[@]}" -d "$dest/c" "${PART_C[@]}"
  du -sh "$dest"/*
}

install() {
  local site="${SITE:-/root/site}"
  mkdir -p "$site"
  for part in "$@"; do
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "$part"/*.whl
  done
  echo "installed into $site: PYTHONPATH=$site:\$PYTHONPATH"
}

case "${1:-}" in
  download) download "${2:?usage: $0 download DEST}" ;;
  install) shift; install "${@:?usage: $0 install PART_DIR [PART_DIR...]}" ;;
  *) echo "usage: $0 download DEST | install PART_DIR [PART_DIR...]" >&2; exit 2 ;;
esac
