"""LoRA adapters: parsing, validation, storage and the registry (everything but the matmul)."""
