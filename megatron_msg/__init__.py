"""megatron_msg: a Megatron-style GPT trainer with Masked Structural Growth."""

__version__ = "0.1.0"
