#!/usr/bin/env bash
# FLM-101B stage 1: train the 16B model from scratch on 192 GPUs (TP 2 x PP 1 x DP 96, ZeRO-1, bf16).
# Usage: stage1_16b.sh [--dry-run] [--hostfile FILE] [--data PREFIX] [--ckpt-root DIR] [KEY=VALUE...]

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
train_stage stage1_16b "$EXAMPLE_DIR/stage1_16b.yaml"
