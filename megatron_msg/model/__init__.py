"""GPT model with MSG masks on every growth dimension."""
