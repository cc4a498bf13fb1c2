#!/usr/bin/env bash
# FLM-101B growth 2: grow the final 51B checkpoint in depth (40 -> 80 layers) into the 101B
# shape with MSG; writes a canonical checkpoint (new layers masked) for stage 3. Runs on one node.
# Usage: grow_51b_to_101b.sh [--dry-run] [--ckpt-root DIR] [-- GROW_ARGS...]

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
grow_stage stage2_51b "$EXAMPLE_DIR/stage2_51b.yaml" stage3_101b "$EXAMPLE_DIR/stage3_101b.yaml"
