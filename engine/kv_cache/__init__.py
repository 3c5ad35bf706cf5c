"""Paged KV cache bookkeeping: which block holds which tokens, shared by hash (no MLX here)."""
