#!/usr/bin/env bash
# FLM-101B growth 1: grow the final 16B checkpoint in width (hidden, ffn, heads) into the 51B
# shape with MSG; writes a canonical checkpoint (new units masked) for stage 2. Runs on one node.
# Usage: grow_16b_to_51b.sh [--dry-run] [--ckpt-root DIR] [-- GROW_ARGS...]

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
grow_stage stage1_16b "$EXAMPLE_DIR/stage1_16b.yaml" stage2_51b "$EXAMPLE_DIR/stage2_51b.yaml"
