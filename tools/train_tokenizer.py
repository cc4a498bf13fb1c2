#!/usr/bin/env python3
"""Thin wrapper: same as `megatron-msg train-tokenizer` (see megatron_msg/data/train_tokenizer.py)."""

import sys
from pathlib import Path

# Runnable from a checkout without installation.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_msg.data.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
