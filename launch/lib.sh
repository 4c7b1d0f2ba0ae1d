# Sourced by the launch scripts: where the launcher tools are, and a rank's one-line error.
#
# stafinetune_tool NAME prints the path of the NAME executable (torchrun, deepspeed,
# accelerate, python3) next to the Python that has stafinetune installed, looking in order:
#   1. $VENV/bin                           (VENV=/path/to/venv: that environment only)
#   2. PATH, when an environment is active (VIRTUAL_ENV or CONDA_PREFIX is set)
#   3. <repository>/.venv/bin               (the repository's own environment)
#   4. PATH
# When none has it, it prints one line saying what to do and the script exits with 127.

STAFINETUNE_REPO="${STAFINETUNE_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"

stafinetune_tool() {
  local name="$1" found=""
  if [[ -n "${VENV:-}" ]]; then
    if [[ -x "$VENV/bin/$name" ]]; then
      echo "$VENV/bin/$name"
      return 0
    fi
    echo "stafinetune: $name not found in VENV=$VENV: install stafinetune there" \
      "(\$VENV/bin/pip install -e $STAFINETUNE_REPO) or unset VENV" >&2
    return 127
  fi
  if [[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]]; then
    found="$(command -v "$name" || true)"
  fi
  if [[ -z "$found" && -x "$STAFINETUNE_REPO/.venv/bin/$name" ]]; then
    found="$STAFINETUNE_REPO/.venv/bin/$name"
  fi
  if [[ -z "$found" ]]; then
    found="$(command -v "$name" || true)"
  fi
  if [[ -z "$found" ]]; then
    echo "stafinetune: $name not found: activate the environment that has stafinetune," \
      "set VENV=/path/to/venv, or create $STAFINETUNE_REPO/.venv" \
      "(python3 -m venv .venv && .venv/bin/pip install -e .)" >&2
    return 127
  fi
  echo "$found"
}

# stafinetune_rank_errors LOG_DIR prints the one-line errors that ranks ended with (exit
# code 2), once each: stafinetune writes each beside torchrun's error file of the rank
# (TORCHELASTIC_ERROR_FILE, under torchrun's --log-dir).
stafinetune_rank_errors() {
  find "$1" -name stafinetune_error.txt -print0 2>/dev/null | sort -z |
    xargs -0 -r cat | awk '!seen[$0]++'
}

# stafinetune_prune_run_dir [hydra.run.dir=DIR ...] removes what ranks rejected at start-up
# leave in the run directory (the last hydra.run.dir= argument): its empty .hydra folders,
# and DIR itself when that leaves it empty. Ranks of one launch cannot remove the shared
# folders themselves while the others are still creating theirs.
stafinetune_prune_run_dir() {
  local arg dir=""
  for arg in "$@"; do [[ "$arg" == hydra.run.dir=* ]] && dir="${arg#hydra.run.dir=}"; done
  if [[ -n "$dir" && -d "$dir/.hydra" ]]; then
    find "$dir/.hydra" -depth -type d -empty -delete 2>/dev/null || true
  fi
  [[ -n "$dir" ]] && rmdir "$dir" 2>/dev/null || true
}
