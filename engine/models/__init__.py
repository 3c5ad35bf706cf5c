"""Transformer models: one shared block (base.py), one small file per model_type."""
