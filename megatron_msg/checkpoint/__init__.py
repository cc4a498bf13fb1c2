"""Checkpoints: topology-free canonical store and DeepSpeed I/O."""
