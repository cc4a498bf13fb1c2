#!/usr/bin/env bash
# FLM-101B stage 2: train the 51B model, starting from the grown 16B checkpoint, on 192 GPUs
# (TP 4 x PP 2 x DP 24, ZeRO-1, bf16).
# Usage: stage2_51b.sh [--dry-run] [--hostfile FILE] [--data PREFIX] [--ckpt-root DIR] [KEY=VALUE...]

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
train_stage stage2_51b "$EXAMPLE_DIR/stage2_51b.yaml" "$CKPT_ROOT/stage2_51b_grown"
