"""The tiny model and synthetic data the multi-process training tests share.

Overrides in `megatron-msg train` key=value form; each test appends its own
schedule, checkpoint and logging keys.
"""

# The model and data alone, for tests that set their own batch and optimizer.
TINY_MODEL_DATA = [
    "model.vocab_size=64",
    "model.hidden_size=32",
    "model.ffn_hidden_size=64",
    "model.num_heads=2",
    "model.head_dim=16",
    "model.num_layers=2",
    "model.max_seq_len=16",
    "data.source=synthetic",
    "data.seq_len=16",
]
TINY_RUN = [
    *TINY_MODEL_DATA,
    "batch.micro_batch_size=2",
    "batch.global_batch_size=8",
    "optimizer.lr=3e-3",
]
