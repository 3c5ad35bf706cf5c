"""Choosing the next token from logits.

``sample`` serves the single-sequence path with one setting for the whole batch; ``Sampler``
serves the engine's batch, where every row brings its own settings in ``SamplingMetadata``.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from engine.sampling_metadata import RowMask, SamplingMetadata, SamplingRow


def sample(logits: mx.array, temperature: float, top_p: float, key: mx.array | None) -> mx.array:
    """One token per row. logits: [B, V] -> [B] (uint32).

    temperature 0 is greedy. Otherwise tokens are drawn from softmax(logits / temperature),
    restricted to the smallest set of most likely tokens whose probability reaches ``top_p``.
    A given ``key`` always draws the same token from the same logits.
    """
    if temperature <= 0:
        return mx.argmax(logits, axis=-1)
    scaled = logits.astype(mx.float32) / temperature
    if top_p < 1.0:
        scaled = _nucleus(scaled, top_p)
    return mx.random.categorical(scaled, axis=-1, key=key)


def _nucleus(logits: mx.array, top_p: float) -> mx.array:
    """Mask (to -inf) every token outside the top-p nucleus; the most likely token always stays."""
    order = mx.argsort(-logits, axis=-1)  # [B, V], most likely first
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits, axis=-1)
    mass_before = mx.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
    keep_sorted = mass_before < top_p
    keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
    return mx.where(keep, logits, -mx.inf)


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """The chosen token's log-probability and the ``len(top_token_ids)`` likeliest tokens.

    Taken from the model's raw logits (log_softmax before bias, penalties, temperature or
    truncation), as vLLM v1 returns them by default: what the model believed, not what the
    sampler was allowed to draw from. ``top_*`` are sorted most likely first.
    """

    token_id: int
    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    token_ids: list[int]  # [B]
    logprobs: list[TokenLogprobs | None]  # [B]; None where the row asked for none


@dataclass(frozen=True, slots=True)
class SampledArrays:
    """A step's sampling, queued on the device and not yet read back."""

    tokens: mx.array  # [B] the sampled token ids
    logprob_arrays: tuple[mx.array, ...]  # chosen [R], top ids [R, N], top logprobs [R, N]
    wanted: tuple[int, ...]  # the R rows that asked for logprobs
    num_logprobs: tuple[int | None, ...]  # [B]


class Sampler:
    """One token per row of a batch, each row under its own settings, vectorized over rows.

    Order, as vLLM's: logit bias and min_tokens suppression → repetition, frequency and presence
    penalties → greedy rows take the argmax → temperature → min_p → top_k → top_p → draw.

    Drawing is a Gumbel race: argmax(logits + g), g ~ Gumbel(0, 1) per token, which picks token
    i with probability softmax(logits)_i. Unseeded rows take their noise from this sampler's own
    key stream; a seeded row's noise comes from a key derived from (seed, num_output_tokens)
    alone, so it draws the same token from the same logits in any batch, at any position.

    top_k / top_p look only at the ``num_candidates`` largest logits of each row (a partial
    top-k is far cheaper than sorting V); a row whose nucleus or k reaches past them is redone
    with a full sort, so the result is exact either way.
    """

    def __init__(self, seed: int = 0, num_candidates: int = 2048) -> None:
        assert num_candidates >= 1, num_candidates
        # A fixed seed, never the process's random state: two engines given the same requests
        # in the same order draw the same tokens (tensor-parallel ranks rely on it).
        self._key = mx.random.key(seed)
        self.num_candidates = num_candidates

    def __call__(self, logits: mx.array, meta: SamplingMetadata) -> SamplerOutput:
        return self.resolve(self.submit(logits, meta))

    def submit(self, logits: mx.array, meta: SamplingMetadata) -> SampledArrays:
        """Queue the sampling of a step on the device; nothing is read back yet, so the caller
        can prepare the next step while this one computes."""
        raw = logits.astype(mx.float32)  # [B, V]
        adjusted = adjust_logits(raw, meta)
        if meta.all_greedy:
            tokens = mx.argmax(adjusted, axis=-1)  # [B]
        else:
            tokens = self._draw(self._truncate(adjusted, meta), meta)
            if meta.any_greedy:
                tokens = mx.where(meta.greedy, mx.argmax(adjusted, axis=-1), tokens)
        wanted = tuple(i for i, n in enumerate(meta.num_logprobs) if n is not None)
        logprob_arrays = _logprob_arrays(raw, tokens, list(wanted), meta) if wanted else []
        mx.async_eval(tokens, *logprob_arrays)
        return SampledArrays(tokens, tuple(logprob_arrays), wanted, meta.num_logprobs)

    @staticmethod
    def resolve(sampled: SampledArrays) -> SamplerOutput:
        """Read a submitted step's tokens (and logprobs) back to the host; waits for it."""
        token_ids = sampled.tokens.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * len(token_ids)
        if sampled.wanted:
            chosen, top_ids, top_lps = (a.tolist() for a in sampled.logprob_arrays)
            for j, i in enumerate(sampled.wanted):
                n = sampled.num_logprobs[i]
                logprobs[i] = TokenLogprobs(token_ids[i], chosen[j], top_ids[j][:n], top_lps[j][:n])
        return SamplerOutput(token_ids, logprobs)

    def _truncate(self, logits: mx.array, meta: SamplingMetadata) -> mx.array:
        """Temperature, then mask (to -inf) what min_p, top_k and top_p rule out. [B, V]."""
        if meta.temperature is not None:
            logits = logits / meta.temperature[:, None]
        if meta.min_p is not None:
            # p_i >= min_p * p_max  <=>  l_i >= l_max + log(min_p); min_p 0 keeps all.
            floor = logits.max(axis=-1, keepdims=True) + mx.log(meta.min_p)[:, None]
            logits = mx.where(logits >= floor, logits, -mx.inf)
        rows = meta.truncated_rows
        if not rows:
            return logits
        if len(rows) == logits.shape[0]:
            cutoff = self._row_cutoffs(logits, meta, rows)  # [B, 1]
        else:
            cutoff = mx.full((logits.shape[0], 1), -mx.inf)
            cutoff[mx.array(rows)] = self._row_cutoffs(logits[mx.array(rows)], meta, rows)
        return mx.where(logits >= cutoff, logits, -mx.inf)

    def _row_cutoffs(
        self, logits: mx.array, meta: SamplingMetadata, rows: tuple[int, ...]
    ) -> mx.array:
        """The smallest logit top_k and top_p keep in each of ``rows``. logits: [R, V] -> [R, 1].

        First from each row's ``num_candidates`` largest logits; the rows whose k or nucleus
        reaches past those are redone from a full sort.
        """
        n, vocab = logits.shape
        k = meta.top_k[mx.array(rows)] if meta.top_k is not None else None  # [R]
        p = meta.top_p[mx.array(rows)] if meta.top_p is not None else None  # [R]
        c = min(self.num_candidates, vocab)
        if c == vocab:
            return _cutoffs(mx.sort(logits, axis=-1)[:, ::-1], vocab, k, p, None)[0]
        top = mx.sort(mx.topk(logits, c, axis=-1), axis=-1)[:, ::-1]  # [R, C], descending
        full_nucleus = set(meta.full_nucleus_rows)
        need_mass = [j for j, r in enumerate(rows) if r in full_nucleus]
        mass = None  # [R] log of the whole row's mass, where the nucleus is normalized over V
        if need_mass:
            mass = mx.zeros((n,))
            mass[mx.array(need_mass)] = mx.logsumexp(logits[mx.array(need_mass)], axis=-1)
        cutoff, covered = _cutoffs(top, vocab, k, p, mass)  # [R, 1], [R]
        missed = [j for j, ok in enumerate(covered.tolist()) if not ok]
        if missed:
            m = mx.array(missed)
            full = mx.sort(logits[m], axis=-1)[:, ::-1]  # [M, V]
            k_m = k[m] if k is not None else None
            p_m = p[m] if p is not None else None
            cutoff[m] = _cutoffs(full, vocab, k_m, p_m, None)[0]
        return cutoff

    def _draw(self, logits: mx.array, meta: SamplingMetadata) -> mx.array:
        """argmax(logits + Gumbel noise) per row. logits: [B, V] -> [B] (greedy rows: junk)."""
        batch, vocab = logits.shape
        parts = []  # (rows, noise [R, V])
        if meta.random_rows:
            self._key, key = mx.random.split(self._key)
            noise = mx.random.gumbel((len(meta.random_rows), vocab), key=key)
            parts.append((meta.random_rows, noise))
        if meta.seeded_rows:
            keys = mx.stack([mx.random.key(k) for k in meta.seed_keys])  # [S, 2]
            noise = mx.vmap(lambda k: mx.random.gumbel((vocab,), key=k))(keys)  # [S, V]
            parts.append((meta.seeded_rows, noise))
        if len(parts) == 1 and len(parts[0][0]) == batch:
            return mx.argmax(logits + parts[0][1], axis=-1)
        noise = mx.zeros((batch, vocab))  # greedy rows draw nothing
        for rows, part in parts:
            noise[mx.array(rows)] = part
        return mx.argmax(logits + noise, axis=-1)


def adjust_logits(logits: mx.array, meta: SamplingMetadata) -> mx.array:
    """Constraint masks, logit bias, min_tokens suppression, penalties, then per-row logits
    processors: what greedy rows take the argmax of. Each is skipped when no row has it.

    Repetition penalty (HF's) on prompt + output tokens: positive logits divided by it,
    negative ones multiplied. Frequency and presence penalties (OpenAI's) on output tokens only:
    minus frequency × count, minus presence once. Edits only the [B, L] penalized cells.
    logits: [B, V] float32 -> [B, V] (a new array: the caller's logits are left as they are).
    """
    if meta.allowed is not None:
        logits = _mask_rows(logits, meta.allowed)
    if meta.logit_bias is not None:
        b = meta.logit_bias
        logits = logits.at[b.rows, b.tokens].add(b.values)
    if meta.suppressed is not None:
        s = meta.suppressed
        logits = logits.at[s.rows, s.tokens].minimum(-mx.inf)
    if meta.penalties is not None:
        pen = meta.penalties
        seen = mx.take_along_axis(logits, pen.tokens, axis=-1)  # [B, L]
        rep = pen.repetition[:, None]
        seen = mx.where(seen > 0, seen / rep, seen * rep)
        seen = seen - pen.frequency[:, None] * pen.output_counts
        seen = seen - pen.presence[:, None] * (pen.output_counts > 0)
        logits = mx.put_along_axis(logits, pen.tokens, seen, axis=-1)
    if meta.processors:
        logits = _process_rows(logits, meta.processors)
    return logits


def _mask_rows(logits: mx.array, allowed: RowMask) -> mx.array:
    """-inf outside each constrained row's allowed tokens; other rows untouched. [B, V]."""
    if len(allowed.rows) == logits.shape[0]:
        return mx.where(allowed.mask, logits, -mx.inf)
    keep = mx.ones(logits.shape, dtype=mx.bool_)
    keep[mx.array(allowed.rows)] = allowed.mask
    return mx.where(keep, logits, -mx.inf)


def _process_rows(logits: mx.array, processors: tuple[tuple[int, SamplingRow], ...]) -> mx.array:
    """Each listed row through its processors, in order; other rows untouched. [B, V]."""
    edited = []
    for i, row in processors:
        x = logits[i]
        for process in row.processors:
            x = process(list(row.output_token_ids), x)
        edited.append(x)
    out = logits + 0  # a copy: assigning rows below must not touch the caller's array
    out[mx.array([i for i, _ in processors])] = mx.stack(edited).astype(logits.dtype)
    return out


def _cutoffs(
    top: mx.array,
    vocab: int,
    top_k: mx.array | None,
    top_p: mx.array | None,
    mass: mx.array | None,
) -> tuple[mx.array, mx.array]:
    """Each row's smallest logit that top_k and top_p keep, and whether ``top`` sufficed.

    top: [B, C] the C largest of each row's V logits, descending; top_k [B] (V = off);
    top_p [B]; mass [B]: logsumexp of the whole row, needed where top_p is on and top_k off,
    unless C = V. Returns cutoff [B, 1] and covered [B]: False where the answer needs logits
    beyond C. Ties at the cutoff are all kept, as in vLLM.
    """
    rows, c = top.shape
    cutoff = mx.full((rows, 1), -mx.inf)
    k_on = mx.zeros((rows,), dtype=mx.bool_)
    covered = mx.ones((rows,), dtype=mx.bool_)
    if top_k is not None:
        k_on = top_k < vocab
        top = mx.where(mx.arange(c)[None] < top_k[:, None], top, -mx.inf)
        kth = mx.take_along_axis(top, (mx.minimum(top_k, c) - 1)[:, None], axis=-1)
        cutoff = mx.where(k_on[:, None], kth, cutoff)
    if top_p is not None:
        p_on = top_p < 1
        # Normalize over the top-k set where k is on (it lies within top), else over all V.
        lse = mx.logsumexp(top, axis=-1)  # [B]
        if mass is not None:
            lse = mx.where(k_on, lse, mass)
        probs = mx.exp(top - lse[:, None])
        mass_before = mx.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
        n_keep = (mass_before < top_p[:, None]).sum(axis=-1)  # >= 1: the top token always stays
        pth = mx.take_along_axis(top, (n_keep - 1)[:, None], axis=-1)
        cutoff = mx.where(p_on[:, None], mx.maximum(cutoff, pth), cutoff)
        covered = ~p_on | (n_keep < c)
    if top_k is not None:
        covered = mx.where(k_on, top_k <= c, covered)
    return cutoff, covered | (c == vocab)


def _logprob_arrays(
    raw: mx.array, tokens: mx.array, wanted: list[int], meta: SamplingMetadata
) -> list[mx.array]:
    """For the wanted rows of raw logits [B, V]: chosen logprob [R], top ids and logprobs [R, N]."""
    rows = mx.array(wanted)
    sub = raw[rows]  # [R, V]
    lp = sub - mx.logsumexp(sub, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(lp, tokens[rows][:, None], axis=-1)[:, 0]  # [R]
    n = min(max(meta.num_logprobs[i] for i in wanted), lp.shape[-1])
    if n == 0:
        empty = mx.zeros((len(wanted), 0))
        return [chosen, empty.astype(mx.int32), empty]
    top_ids = mx.argpartition(-lp, kth=n - 1, axis=-1)[:, :n]  # [R, N], unordered
    top_lp = mx.take_along_axis(lp, top_ids, axis=-1)
    order = mx.argsort(-top_lp, axis=-1)
    return [chosen, mx.take_along_axis(top_ids, order, -1), mx.take_along_axis(top_lp, order, -1)]
