"""Every row's sampling settings for one step, gathered into batched arrays for the sampler.

Built once per step from the rows about to sample. A field is None (or a row list empty) when no
row in the batch needs it, so the sampler skips that work entirely: a batch without penalties
never looks at its token lists, an all-greedy batch needs nothing but the logit adjustments and
an argmax. Nothing here is [B, V]: bias, stop suppression and penalties are sparse edits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np

from engine.request import LogitsProcessor, Request
from engine.sampling_params import SamplingParams

GREEDY_BELOW = 1e-5  # a temperature this small is greedy: dividing by it overflows float32
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class SamplingRow:
    """What the sampler needs of one request: its settings and the tokens it has seen so far.

    ``allowed`` (bool [V]) restricts the row to a token set (a constraint's mask);
    ``processors`` edit the row's logits in order. Rows with neither cost nothing extra.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    eos_token_ids: frozenset[int] = frozenset()
    num_unseen: int = 0  # tokens already sampled on the device, not yet in output_token_ids
    allowed: np.ndarray | None = None
    processors: tuple[LogitsProcessor, ...] = ()

    @property
    def num_output_tokens(self) -> int:
        """Index, among the outputs, of the token about to be sampled."""
        return len(self.output_token_ids) + self.num_unseen

    @classmethod
    def from_request(cls, request: Request, vocab_size: int | None = None) -> SamplingRow:
        """The row of a request being sampled this step: its ``num_pending`` counts this
        step's token too, so the ones before it are unseen."""
        allowed = None
        if request.constraint is not None:
            assert vocab_size is not None, "a constrained row needs the vocabulary size"
            allowed = np.asarray(request.constraint.allowed(vocab_size), dtype=bool)
            if allowed.shape != (vocab_size,) or not allowed.any():
                raise ValueError(
                    f"request {request.request_id!r}: its constraint allows no token "
                    f"(mask of shape {allowed.shape}, {int(allowed.sum())} allowed)"
                )
        return cls(
            request.sampling_params,
            request.prompt_token_ids,
            request.output_token_ids,
            request.eos_token_ids,
            max(request.num_pending - 1, 0),
            allowed,
            request.logits_processors,
        )

    @classmethod
    def positions(
        cls, request: Request, drafts: Sequence[int], vocab_size: int
    ) -> list[SamplingRow]:
        """The rows a request samples in one step: after its newest token, then after each
        draft, each seeing the drafts before it as outputs (penalties, min_tokens and seeds
        follow them exactly as one-token steps would)."""
        row = cls.from_request(request, vocab_size)
        if not drafts:
            return [row]
        outputs = list(request.output_token_ids)
        return [
            replace(row, output_token_ids=outputs + list(drafts[:i]))
            for i in range(len(drafts) + 1)
        ]


@dataclass(frozen=True, slots=True)
class SparseEdit:
    """A few (row, token) cells of a [B, V] array, and what goes there where that varies."""

    rows: mx.array  # [N] int32
    tokens: mx.array  # [N] int32
    values: mx.array | None = None  # [N] float32


@dataclass(frozen=True, slots=True)
class RowMask:
    """The constrained rows of a batch and the tokens each may sample."""

    rows: tuple[int, ...]
    mask: mx.array  # [M, V] bool, True where allowed

    @classmethod
    def from_rows(cls, rows: Sequence[SamplingRow]) -> RowMask | None:
        masked = [i for i, r in enumerate(rows) if r.allowed is not None]
        if not masked:
            return None
        return cls(tuple(masked), mx.array(np.stack([rows[i].allowed for i in masked])))


@dataclass(frozen=True, slots=True)
class Penalties:
    """Repetition, frequency and presence penalties, gathered sparsely.

    Each row lists the distinct tokens it may penalize (prompt + output where it has a
    repetition penalty, else the output), padded to a common length L by repeating its first
    entry: a repeated (token, count) pair computes and writes the same value twice. A row that
    penalizes nothing carries token 0, count 0 and neutral penalties, which leave its logit
    bit-for-bit unchanged. This touches [B, L] logits instead of building [B, V] masks.
    """

    tokens: mx.array  # [B, L] int32
    output_counts: mx.array  # [B, L] float32: occurrences of the token in the output so far
    repetition: mx.array  # [B] float32, 1 where off
    presence: mx.array  # [B] float32, 0 where off
    frequency: mx.array  # [B] float32, 0 where off

    @classmethod
    def from_rows(cls, rows: Sequence[SamplingRow], vocab_size: int) -> Penalties | None:
        params = [r.params for r in rows]
        repeats = [p.repetition_penalty != 1.0 for p in params]
        outputs = [p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params]
        if not any(repeats) and not any(outputs):
            return None
        entries = [
            _distinct_tokens(row, with_prompt=rep) if rep or out else _NOTHING
            for row, rep, out in zip(rows, repeats, outputs, strict=True)
        ]
        width = max(1, *(len(ids) for ids, _ in entries))
        tokens = np.zeros((len(rows), width), dtype=np.int64)
        counts = np.zeros((len(rows), width), dtype=np.float32)
        for i, (ids, n) in enumerate(entries):
            if len(ids):
                tokens[i], counts[i] = ids[0], n[0]  # the padding
                tokens[i, : len(ids)], counts[i, : len(ids)] = ids, n
        _check_ids(tokens, vocab_size, "prompt or output")
        penalized = [len(ids) > 0 for ids, _ in entries]

        def column(name: str, off: float) -> mx.array:
            pairs = zip(params, penalized, strict=True)
            return mx.array([getattr(p, name) if on else off for p, on in pairs], dtype=mx.float32)

        return cls(
            tokens=mx.array(tokens, dtype=mx.int32),
            output_counts=mx.array(counts),
            repetition=column("repetition_penalty", 1.0),
            presence=column("presence_penalty", 0.0),
            frequency=column("frequency_penalty", 0.0),
        )


_NOTHING = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))


def _distinct_tokens(row: SamplingRow, with_prompt: bool) -> tuple[np.ndarray, np.ndarray]:
    """The row's distinct tokens, sorted, and how often each occurs in its output."""
    out_ids, out_counts = np.unique(
        np.asarray(row.output_token_ids, dtype=np.int64), return_counts=True
    )
    ids = out_ids
    if with_prompt:
        ids = np.union1d(out_ids, np.asarray(row.prompt_token_ids, dtype=np.int64))
    counts = np.zeros(len(ids), dtype=np.float32)
    counts[np.searchsorted(ids, out_ids)] = out_counts
    return ids, counts


@dataclass(frozen=True, slots=True)
class SamplingMetadata:
    """Batched settings for B rows over a vocabulary of V logits.

    Invariants: greedy rows carry temperature 1, top_k V, top_p 1 and min_p 0, so the sampled
    path leaves their logits alone; a disabled top_k is V. ``seed_keys`` holds the 64-bit
    integer each seeded row's noise comes from, a function of (seed, num_output_tokens) only.
    """

    vocab_size: int
    greedy: mx.array  # [B] bool
    all_greedy: bool
    any_greedy: bool
    temperature: mx.array | None  # [B] float32; None when all greedy or all 1
    min_p: mx.array | None  # [B] float32
    top_k: mx.array | None  # [B] int32, V where off
    top_p: mx.array | None  # [B] float32, 1 where off
    logit_bias: SparseEdit | None
    suppressed: SparseEdit | None  # stop ids masked while num_output_tokens < min_tokens
    penalties: Penalties | None
    truncated_rows: tuple[int, ...]  # top_k or top_p on
    full_nucleus_rows: tuple[int, ...]  # top_p on, top_k off: the nucleus is normalized over V
    random_rows: tuple[int, ...]  # sampled without a seed: noise from the sampler's key stream
    seeded_rows: tuple[int, ...]
    seed_keys: tuple[int, ...]  # one per seeded row
    num_logprobs: tuple[int | None, ...]  # [B]; None: the row wants none
    allowed: RowMask | None = None  # constrained rows: every other token is masked out
    processors: tuple[tuple[int, SamplingRow], ...] = ()  # (row, its settings) with processors

    @property
    def batch_size(self) -> int:
        return len(self.num_logprobs)

    @classmethod
    def from_requests(cls, requests: Sequence[Request], vocab_size: int) -> SamplingMetadata:
        return cls.from_rows(
            [SamplingRow.from_request(r, vocab_size) for r in requests], vocab_size
        )

    @classmethod
    def from_rows(cls, rows: Sequence[SamplingRow], vocab_size: int) -> SamplingMetadata:
        assert rows, "a step samples at least one row"
        params = [r.params for r in rows]
        greedy = [p.temperature < GREEDY_BELOW for p in params]
        sampled = [(p, not g) for p, g in zip(params, greedy, strict=True)]

        def per_row(value, off: float, dtype=mx.float32) -> mx.array | None:
            """[B] of value(p) on sampled rows, ``off`` on greedy ones; None if all are off."""
            column = [value(p) if s else off for p, s in sampled]
            return None if all(v == off for v in column) else mx.array(column, dtype=dtype)

        def top_k(p: SamplingParams) -> int:
            return p.top_k if 0 < p.top_k < vocab_size else vocab_size

        seeded = [i for i, (p, s) in enumerate(sampled) if s and p.seed is not None]
        unseeded = [i for i, (p, s) in enumerate(sampled) if s and p.seed is None]
        truncated = [
            i for i, (p, s) in enumerate(sampled) if s and (p.top_p < 1 or top_k(p) < vocab_size)
        ]
        full_nucleus = [i for i in truncated if top_k(params[i]) == vocab_size]
        return cls(
            vocab_size=vocab_size,
            greedy=mx.array(greedy),
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            temperature=per_row(lambda p: p.temperature, 1.0),
            min_p=per_row(lambda p: p.min_p, 0.0),
            top_k=per_row(top_k, vocab_size, mx.int32),
            top_p=per_row(lambda p: p.top_p, 1.0),
            logit_bias=_logit_bias(params, vocab_size),
            suppressed=_suppressed(rows, vocab_size),
            penalties=Penalties.from_rows(rows, vocab_size),
            truncated_rows=tuple(truncated),
            full_nucleus_rows=tuple(full_nucleus),
            random_rows=tuple(unseeded),
            seeded_rows=tuple(seeded),
            seed_keys=tuple(seed_key(params[i].seed, rows[i].num_output_tokens) for i in seeded),
            num_logprobs=tuple(p.logprobs for p in params),
            allowed=RowMask.from_rows(rows),
            processors=tuple((i, r) for i, r in enumerate(rows) if r.processors),
        )


def seed_key(seed: int, step: int) -> int:
    """A well-mixed 64-bit key from (seed, step): nearby seeds and steps give unrelated noise."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _check_ids(ids: np.ndarray, vocab_size: int, what: str) -> None:
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"{what} token ids outside [0, {vocab_size}): {sorted(set(bad.tolist()))}")


def _sparse(cells: list[tuple[int, int]], vocab_size: int, what: str) -> tuple[mx.array, mx.array]:
    rows, tokens = np.array(cells, dtype=np.int64).reshape(-1, 2).T
    _check_ids(tokens, vocab_size, what)
    return mx.array(rows, dtype=mx.int32), mx.array(tokens, dtype=mx.int32)


def _logit_bias(params: list[SamplingParams], vocab_size: int) -> SparseEdit | None:
    cells = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias.items()]
    if not cells:
        return None
    rows, tokens = _sparse([(i, t) for i, t, _ in cells], vocab_size, "logit_bias")
    return SparseEdit(rows, tokens, mx.array([b for *_, b in cells], dtype=mx.float32))


def _suppressed(rows: Sequence[SamplingRow], vocab_size: int) -> SparseEdit | None:
    cells = []
    for i, row in enumerate(rows):
        p = row.params
        if row.num_output_tokens < p.min_tokens:
            stops = p.stop_token_ids if p.ignore_eos else p.stop_token_ids | row.eos_token_ids
            cells.extend((i, t) for t in sorted(stops))
    return SparseEdit(*_sparse(cells, vocab_size, "stop")) if cells else None
