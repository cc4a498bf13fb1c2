# Shared by the launch scripts of examples/flm101b (and examples/gpt2_msg): argument
# parsing, the checks a dry run makes, and how a command is shown or run.
# Source it; do not run it. Every script accepts:
#   --dry-run            resolve and check everything, run the planner, print the command; no GPUs
#   --hostfile FILE      DeepSpeed hostfile (default: $HOSTFILE or ./hostfile next to the script)
#   --data PREFIX        indexed dataset prefix (PREFIX.bin / PREFIX.idx)
#   --ckpt-root DIR      where every stage's checkpoints go
#   --runs-root DIR      where every stage's run directory (logs, resolved config) goes
#   --nodes N            nodes (SLURM and single-node scripts; the deepspeed scripts use the hostfile)
#   --gpus-per-node N    GPUs per node (default 8)
#   KEY=VALUE            extra config overrides passed on to `megatron-msg train`
#   -- ARGS...           extra arguments passed on to `megatron-msg grow` (grow scripts)

set -euo pipefail

EXAMPLE_DIR="${EXAMPLE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
REPO_ROOT="$(cd "$EXAMPLE_DIR/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
DRY_RUN=0
HOSTFILE="${HOSTFILE:-$EXAMPLE_DIR/hostfile}"
DATA_PREFIX="${DATA_PREFIX:-$REPO_ROOT/data/flm/corpus_text_document}"
CKPT_ROOT="${CKPT_ROOT:-$REPO_ROOT/checkpoints/flm101b}"
RUNS_ROOT="${RUNS_ROOT:-$REPO_ROOT/runs/flm101b}"
MASTER_PORT="${MASTER_PORT:-29500}"
NODES="${SLURM_NNODES:-}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
OVERRIDES=()
PASSTHROUGH=()
PROBLEMS=0

die() { echo "error: $*" >&2; exit 1; }
say() { echo "[$(basename "$0")] $*"; }

# A problem stops a real launch; a dry run reports it and goes on (CI has no data or cluster).
problem() {
  if ((DRY_RUN)); then
    say "would stop a real launch: $*"
    PROBLEMS=$((PROBLEMS + 1))
  else
    die "$*"
  fi
}

# The calling script's header comment, then the options above.
usage() {
  awk 'NR > 1 && !/^#/ {exit} /^# / || /^#$/ {sub(/^# ?/, ""); print}' "$0"
  echo
  awk '/^#   [-A-Z]/ {sub(/^# /, ""); print}' "${BASH_SOURCE[0]}"
}

parse_args() {
  while (($#)); do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      --hostfile) HOSTFILE="${2:?--hostfile needs a file}"; shift ;;
      --data) DATA_PREFIX="${2:?--data needs a prefix}"; shift ;;
      --ckpt-root) CKPT_ROOT="${2:?--ckpt-root needs a directory}"; shift ;;
      --runs-root) RUNS_ROOT="${2:?--runs-root needs a directory}"; shift ;;
      --nodes) NODES="${2:?--nodes needs a number}"; shift ;;
      --gpus-per-node) GPUS_PER_NODE="${2:?--gpus-per-node needs a number}"; shift ;;
      -h | --help) usage; exit 0 ;;
      --) shift; PASSTHROUGH=("$@"); break ;;
      *=*) OVERRIDES+=("$1") ;;
      *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
  done
  CKPT_ROOT="$(absolute "$CKPT_ROOT")"
  RUNS_ROOT="$(absolute "$RUNS_ROOT")"
  DATA_PREFIX="$(absolute "$DATA_PREFIX")"
  if [[ "$PYTHON" == */* ]]; then PYTHON="$(absolute "$PYTHON")"; fi
}

absolute() {
  case "$1" in
    /*) echo "$1" ;;
    *) echo "$PWD/$1" ;;
  esac
}

check_python() {
  "$PYTHON" -c "import megatron_msg" 2>/dev/null \
    || die "$PYTHON cannot import megatron_msg (set PYTHON=/path/to/venv/bin/python)"
}

# The hostfile decides the world size. A dry run without one uses hostfile.example.
resolve_hostfile() {
  if [[ ! -f "$HOSTFILE" ]]; then
    if ((DRY_RUN)) && [[ -f "$EXAMPLE_DIR/hostfile.example" ]]; then
      say "no hostfile at $HOSTFILE; the dry run uses hostfile.example"
      HOSTFILE="$EXAMPLE_DIR/hostfile.example"
    else
      die "hostfile $HOSTFILE not found (copy hostfile.example and edit it, or pass --hostfile)"
    fi
  fi
  HOSTFILE="$(absolute "$HOSTFILE")"
  SLOTS="$(awk '{sub(/#.*/, "")} NF {n += substr($2, 7)} END {print n + 0}' "$HOSTFILE")"
  NODES="$(awk '{sub(/#.*/, "")} NF {n++} END {print n + 0}' "$HOSTFILE")"
  say "hostfile $HOSTFILE: $NODES nodes, $SLOTS GPU slots"
}

need_config() {
  [[ -f "$1" ]] || die "config $1 not found"
  echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
}

need_data() {
  if [[ -f "$DATA_PREFIX.bin" && -f "$DATA_PREFIX.idx" ]]; then
    say "data $DATA_PREFIX.{bin,idx} found"
  else
    problem "indexed dataset $DATA_PREFIX.bin/.idx not found (build it with megatron-msg preprocess; pass --data)"
  fi
}

need_dir() {  # need_dir DIR WHAT
  if [[ -d "$1" ]]; then
    say "$2 $1 found"
  else
    problem "$2 $1 not found"
  fi
}

# find_launcher NAME: sets LAUNCHER to NAME from PATH or from $PYTHON's bin directory.
find_launcher() {
  local beside
  beside="$(dirname "$PYTHON")/$1"
  if command -v "$1" >/dev/null 2>&1; then
    LAUNCHER="$(command -v "$1")"
  elif [[ "$PYTHON" == */* && -x "$beside" ]]; then
    LAUNCHER="$beside"
  else
    LAUNCHER="$1"
    problem "launcher '$1' is neither on PATH nor next to $PYTHON"
  fi
}

# plan CONFIG... : the planner with every check strict (world size from the hostfile
# or from $PLAN_GPUS); a layout that does not fit in GPU memory stops here.
plan() {
  local where=(--hostfile "$HOSTFILE")
  [[ -n "${PLAN_GPUS:-}" ]] && where=(--gpus "$PLAN_GPUS")
  [[ -n "${PLAN_JSON:-}" ]] && where+=(--json-out "$PLAN_JSON")
  say "planning: megatron-msg plan --strict ${where[*]} $*"
  (cd "$REPO_ROOT" && "$PYTHON" -m megatron_msg.cli plan --strict "${where[@]}" "$@") \
    || die "the planner rejected the configuration (see above)"
}

# Free space where the grow step writes, against what it will write.
check_space() {  # check_space DIR BYTES
  local dir="$1" need="$2" probe="$1"
  while [[ ! -d "$probe" ]]; do probe="$(dirname "$probe")"; done
  local free
  free="$("$PYTHON" -c "import shutil, sys; print(shutil.disk_usage(sys.argv[1]).free)" "$probe")"
  if ((free < need)); then
    problem "$dir needs $((need / 1000000000)) GB free for the grown checkpoint, $((free / 1000000000)) GB available"
  else
    say "space: $((free / 1000000000)) GB free at $probe, the grow step writes $((need / 1000000000)) GB"
  fi
}

# run CMD... : show the command; unless this is a dry run, run it from the repository root.
run() {
  printf '[%s] command:' "$(basename "$0")"
  printf ' %q' "$@"
  printf '\n'
  ((DRY_RUN)) || (cd "$REPO_ROOT" && "$@")
}

finish() {
  ((DRY_RUN)) || return 0
  if ((PROBLEMS)); then
    say "dry run done: $PROBLEMS problem(s) above must be fixed before a real launch"
  else
    say "dry run done: everything resolved"
  fi
}

# prepare_train NAME CONFIG [INIT_DIR]: checks; sets TRAIN_ARGS to `megatron-msg train`'s arguments.
# INIT_DIR is a canonical checkpoint written by the grow step, loaded at this stage's layout.
prepare_train() {
  local config
  config="$(need_config "$2")"
  check_python
  plan "$config"
  need_data
  [[ -z "${3:-}" ]] || need_dir "$3" "grown canonical checkpoint"
  train_args "$1" "$config" "${3:-}"
}

# train_args NAME CONFIG [INIT_DIR]: sets TRAIN_ARGS (no checks).
train_args() {
  TRAIN_ARGS=(train --config "$2" "data.prefixes=[$DATA_PREFIX]"
    "checkpoint.dir=$CKPT_ROOT/$1" "train.run_dir=$RUNS_ROOT/$1")
  [[ -z "${3:-}" ]] || TRAIN_ARGS+=("checkpoint.load=$3")
  TRAIN_ARGS+=(${OVERRIDES[@]+"${OVERRIDES[@]}"})
}

# train_stage NAME CONFIG [INIT_DIR]: one stage on the whole hostfile with the deepspeed launcher.
train_stage() {
  resolve_hostfile
  prepare_train "$@"
  find_launcher deepspeed
  run "$LAUNCHER" --hostfile "$HOSTFILE" --master_port "$MASTER_PORT" \
    --module megatron_msg.cli "${TRAIN_ARGS[@]}"
  finish
}

# grow_stage SOURCE_NAME SOURCE_CONFIG TARGET_NAME TARGET_CONFIG: the offline growth step.
# It runs on one node (CPU and the shared filesystem), streaming tensor by tensor.
grow_stage() {
  local src_name="$1" src_config tgt_name="$3" tgt_config
  src_config="$(need_config "$2")"
  tgt_config="$(need_config "$4")"
  check_python
  resolve_hostfile
  PLAN_JSON="$(mktemp)"
  trap 'rm -f "${PLAN_JSON:-}"' EXIT
  plan "$src_config" "$tgt_config"
  local load="$CKPT_ROOT/$src_name" save="$CKPT_ROOT/${tgt_name}_grown" bytes
  bytes="$("$PYTHON" -c "import json, sys; print(int(json.load(open(sys.argv[1]))['growth'][0]['write_bytes']))" "$PLAN_JSON")"
  rm -f "$PLAN_JSON"
  PLAN_JSON=""
  need_dir "$load" "stage checkpoint"
  if [[ -e "$save" ]]; then problem "$save exists already; remove it or grow into another --ckpt-root"; fi
  check_space "$save" "$bytes"
  run "$PYTHON" -m megatron_msg.cli grow --load "$load" --save "$save" --target-config "$tgt_config" \
    ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}
  finish
}
