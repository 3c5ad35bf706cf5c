"""Turning files on disk (Hugging Face folders, GGUF files) into models and tokenizers."""
