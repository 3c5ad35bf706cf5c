"""The one interface the engine knows constrained decoding by: a per-request matcher that says
which tokens may come next and follows the tokens that did.

The sampler masks a constrained row's logits to ``allowed()`` (every other token gets -inf);
rows without a constraint keep the vectorized path untouched. A constrained row needs its
previous token on the host before its next mask exists, so its steps never overlap.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import numpy as np


class TokenConstraint(Protocol):
    def allowed(self, vocab_size: int) -> np.ndarray:
        """bool [vocab_size]: the tokens that may be sampled next (at least one)."""
        ...

    def advance(self, token_id: int) -> None:
        """Follow a sampled token (one of the allowed ones)."""
        ...

    @property
    def done(self) -> bool:
        """Nothing more may follow: the request stops."""
        ...


class TokenSet:
    """Every step may sample only from a fixed set of tokens; never done by itself."""

    def __init__(self, token_ids: Iterable[int]) -> None:
        self.token_ids = np.array(sorted(set(token_ids)), dtype=np.int64)
        if self.token_ids.size == 0:
            raise ValueError("a token set needs at least one token")

    def allowed(self, vocab_size: int) -> np.ndarray:
        mask = np.zeros(vocab_size, dtype=bool)
        mask[self.token_ids[self.token_ids < vocab_size]] = True
        return mask

    def advance(self, token_id: int) -> None:
        if token_id not in self.token_ids:
            raise ValueError(f"token {token_id} is outside the allowed set")

    @property
    def done(self) -> bool:
        return False
