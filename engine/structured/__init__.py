"""Constrained decoding: grammar matchers behind one per-row token-mask interface."""
