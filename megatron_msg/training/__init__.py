"""DeepSpeed-driven training loop with in-run growth."""
