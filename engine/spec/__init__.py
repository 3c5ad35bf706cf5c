"""Speculative decoding: proposers of draft tokens that one step verifies together."""
