#!/usr/bin/env bash
# GPT-2 with MSG on one node: the Appendix-J schedule as four training stages with an offline
# growth step between them (the FLM-101B workflow at GPT-2 scale): train stage1, grow into
# stage2, train stage2, ... Each stage is a torchrun job on this node's GPUs.
# Usage: run.sh [--dry-run] [--gpus-per-node 8] [--data PREFIX] [--ckpt-root DIR]
#               [--from-stage K] [KEY=VALUE...]
#   --from-stage K   start at stage K (1-4); stage K-1's checkpoint must exist for K > 1

set -euo pipefail
EXAMPLE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$EXAMPLE_DIR/../.." && pwd)"
DATA_PREFIX="${DATA_PREFIX:-$REPO/data/gpt2/openwebtext_text_document}"
CKPT_ROOT="${CKPT_ROOT:-$REPO/checkpoints/gpt2_msg}"
RUNS_ROOT="${RUNS_ROOT:-$REPO/runs/gpt2_msg}"
source "$EXAMPLE_DIR/../flm101b/common.sh"

FROM_STAGE=1
ARGS=()
while (($#)); do
  case "$1" in
    --from-stage) FROM_STAGE="${2:?--from-stage needs 1-4}"; shift ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
parse_args ${ARGS[@]+"${ARGS[@]}"}
[[ "$FROM_STAGE" =~ ^[1-4]$ ]] || die "--from-stage must be 1, 2, 3 or 4, got '$FROM_STAGE'"

STAGES=(stage1 stage2 stage3 stage4)
CONFIGS=()
for stage in "${STAGES[@]}"; do CONFIGS+=("$(need_config "$EXAMPLE_DIR/$stage.yaml")"); done
PLAN_GPUS="$GPUS_PER_NODE"
say "one node, $PLAN_GPUS GPUs"

check_python
plan "${CONFIGS[@]}"   # every stage, and the bytes each growth step reads and writes
need_data
find_launcher torchrun
TORCHRUN="$LAUNCHER"
if ((FROM_STAGE > 1)); then
  need_dir "$CKPT_ROOT/${STAGES[FROM_STAGE - 2]}" "checkpoint of the stage before"
fi

for ((i = FROM_STAGE - 1; i < 4; i++)); do
  stage="${STAGES[i]}"
  init=""
  if ((i > 0)); then
    init="$CKPT_ROOT/${stage}_grown"
    run "$PYTHON" -m megatron_msg.cli grow --load "$CKPT_ROOT/${STAGES[i - 1]}" --save "$init" \
      --target-config "${CONFIGS[i]}"
  fi
  train_args "$stage" "${CONFIGS[i]}" "$init"
  run "$TORCHRUN" --standalone --nproc_per_node "$GPUS_PER_NODE" -m megatron_msg.cli "${TRAIN_ARGS[@]}"
done
finish
