"""Draft tokens for a running request, verified by the next step all at once.

A step feeds a request its newest token plus k drafts, samples at each of the k + 1 positions,
and keeps the drafts up to the first one that differs from what was sampled before it, plus that
sampled token. Sampling first and comparing after is exact for drafts that are fixed tokens (as
these are): a draft is kept with the probability the model gives it, and a rejected position's
token is drawn from the model's distribution without the draft. So the tokens equal those of k + 1
one-token steps; only the number of steps changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class DraftProposer(Protocol):
    def propose(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        """Up to ``max_tokens`` guesses of the tokens that follow ``token_ids``."""
        ...


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the context's last ``n`` tokens
    (longest n first, from ``max_n`` down to ``min_n``) and propose what followed it. Cheap, and
    good where outputs copy their input (code edits, extraction, summaries that quote)."""

    def __init__(self, num_tokens: int = 4, min_n: int = 1, max_n: int = 3) -> None:
        assert num_tokens >= 1 and 1 <= min_n <= max_n
        self.num_tokens, self.min_n, self.max_n = num_tokens, min_n, max_n

    def propose(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        k = min(self.num_tokens, max_tokens)
        if k <= 0:
            return []
        ids = list(token_ids)
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            tail = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start : start + n] == tail:
                    return ids[start + n : start + n + k]
        return []
