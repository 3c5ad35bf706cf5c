"""The inference engine: models, weights, tokenizers and generation. No HTTP in here."""
