#!/usr/bin/env bash
# FLM-101B stage 3: train the 101B model, starting from the grown 51B checkpoint, on 192 GPUs
# (TP 4 x PP 4 x DP 12, ZeRO-1, bf16).
# Usage: stage3_101b.sh [--dry-run] [--hostfile FILE] [--data PREFIX] [--ckpt-root DIR] [KEY=VALUE...]

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
train_stage stage3_101b "$EXAMPLE_DIR/stage3_101b.yaml" "$CKPT_ROOT/stage3_101b_grown"
