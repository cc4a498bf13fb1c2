#!/usr/bin/env python3
"""Thin wrapper: same as `megatron-msg grow` (see megatron_msg/growth/grow_cli.py)."""

import sys
from pathlib import Path

# Runnable from a checkout without installation.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_msg.growth.grow_cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
