"""The batched sampler: each setting does what its definition says, row by row, and a row's
token never depends on which other rows share its batch."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from engine.request import Request
from engine.sampler import Sampler, adjust_logits
from engine.sampling_metadata import SamplingMetadata, SamplingRow
from engine.sampling_params import SamplingParams

PROBS = [0.5, 0.3, 0.15, 0.05]
LOGITS = [math.log(p) for p in PROBS]
WIDE = mx.random.normal((16, 1000), key=mx.random.key(3)) * 2  # [16, 1000]


def meta(params: list[SamplingParams], vocab: int, outputs=None, prompts=None, eos=frozenset()):
    outputs = outputs or [[] for _ in params]
    prompts = prompts or [[] for _ in params]
    rows = [
        SamplingRow(p, prompt, out, eos)
        for p, prompt, out in zip(params, prompts, outputs, strict=True)
    ]
    return SamplingMetadata.from_rows(rows, vocab)


def freqs(logits: list[float], sampler: Sampler | None = None, n: int = 4000, **kw) -> np.ndarray:
    """Token frequencies over n independent unseeded rows sharing one batch."""
    batch = mx.array([logits] * n)
    out = (sampler or Sampler(seed=0))(batch, meta([SamplingParams(**kw)] * n, len(logits)))
    return np.bincount(out.token_ids, minlength=len(logits)) / n


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_greedy_is_argmax():
    logits = mx.array([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
    out = Sampler()(logits, meta([SamplingParams(temperature=0)] * 2, 3))
    assert out.token_ids == [1, 0]
    assert out.logprobs == [None, None]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_follows_softmax_of_scaled_logits(temperature):
    expected = softmax(np.array(LOGITS) / temperature)
    np.testing.assert_allclose(freqs(LOGITS, temperature=temperature), expected, atol=0.03)


@pytest.mark.parametrize("num_candidates", [2048, 2])  # 2: k reaches past, full sort fallback
def test_top_k_keeps_exactly_k(num_candidates):
    logits = [2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2]
    f = freqs(logits, Sampler(seed=1, num_candidates=num_candidates), top_k=3)
    top3 = [0, 6, 1]
    assert set(np.flatnonzero(f)) == set(top3)
    np.testing.assert_allclose(f[top3], softmax(np.array(logits)[top3]), atol=0.03)


@pytest.mark.parametrize("num_candidates", [2048, 1])  # 1: the nucleus reaches past, fallback
def test_top_p_keeps_the_smallest_nucleus_reaching_p(num_candidates):
    sampler = Sampler(seed=2, num_candidates=num_candidates)
    # 0.5 + 0.3 = 0.8 >= 0.75: tokens 2 and 3 are out, the rest renormalized to 5/8, 3/8.
    f = freqs(LOGITS, sampler, top_p=0.75)
    assert f[2] == 0 and f[3] == 0
    np.testing.assert_allclose(f[:2], [0.625, 0.375], atol=0.03)
    # A nucleus smaller than the top token still keeps it.
    assert freqs(LOGITS, sampler, n=200, top_p=0.01)[0] == 1.0


@pytest.mark.parametrize("num_candidates", [2048, 1])
def test_top_p_applies_to_the_distribution_left_by_top_k(num_candidates):
    # top_k 3 renormalizes to 0.526, 0.316, 0.158: two tokens reach top_p 0.82, where the
    # unrenormalized 0.5 + 0.3 would not and token 2 would stay.
    f = freqs(LOGITS, Sampler(seed=3, num_candidates=num_candidates), top_k=3, top_p=0.82)
    assert f[2] == 0 and f[3] == 0
    np.testing.assert_allclose(f[:2], [0.625, 0.375], atol=0.03)


def test_min_p_is_relative_to_the_top_probability():
    ratio = PROBS[3] / PROBS[0]  # token 3 sits exactly at min_p = 0.1
    assert freqs(LOGITS, min_p=ratio * 0.999)[3] > 0.02
    assert freqs(LOGITS, min_p=ratio * 1.001)[3] == 0
    np.testing.assert_allclose(freqs(LOGITS, min_p=0.5)[:2], [0.625, 0.375], atol=0.03)


def test_fast_top_k_top_p_matches_full_sort():
    params = [
        SamplingParams(top_k=k, top_p=p, min_p=m, temperature=t)
        for k, p, m, t in [
            (0, 0.9, 0, 1.0),
            (50, 1.0, 0, 0.7),
            (700, 0.99, 0, 1.3),
            (5, 0.3, 0.05, 1.0),
            (0, 0.999, 0, 2.0),
            (300, 0.5, 0, 1.0),
            (0, 1.0, 0.2, 1.0),
            (1, 1.0, 0, 1.0),
        ]
    ]
    m = meta(params * 2, 1000)
    ref = Sampler(num_candidates=1000)._truncate(WIDE, m)
    for c in (1, 16, 256):
        np.testing.assert_array_equal(
            np.isinf(Sampler(num_candidates=c)._truncate(WIDE, m)), np.isinf(ref)
        )
    kept = (~np.isinf(np.array(ref))).sum(axis=-1)
    assert kept[1] == 50 and kept[7] == 1 and kept[0] < 1000


def test_penalties_touch_only_seen_tokens():
    logits = mx.array([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]] * 3) + mx.array([[0.0], [0.1], [0.3]])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    m = meta(
        [params, SamplingParams(), SamplingParams(frequency_penalty=1.0)],
        6,
        prompts=[[0, 1], [0, 3, 4], [5]],
        outputs=[[2, 2, 1], [1, 1, 2, 3], [5]],
    )
    adjusted = np.array(adjust_logits(logits, m))
    np.testing.assert_array_equal(adjusted[1], np.array(logits)[1])  # no penalty: bit-exact
    np.testing.assert_allclose(adjusted[2], np.array(logits)[2] - [0, 0, 0, 0, 0, 1], rtol=1e-6)
    got = adjusted[0]
    expected = [
        2.0 / 2,  # prompt, positive: divided
        -1.0 * 2 - 0.5 - 0.25 * 1,  # prompt and output once, negative: multiplied
        0.5 / 2 - 0.5 - 0.25 * 2,  # output twice
        3.0,  # unseen
        -2.0,
        1.0,
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_presence_and_frequency_ignore_the_prompt():
    params = SamplingParams(presence_penalty=1.0, frequency_penalty=1.0)
    m = meta([params], 3, prompts=[[0, 0, 1]], outputs=[[2]])
    got = np.array(adjust_logits(mx.zeros((1, 3)), m))[0]
    np.testing.assert_allclose(got, [0, 0, -2])


def test_repetition_penalty_changes_the_greedy_choice():
    params = SamplingParams(temperature=0, repetition_penalty=1.5)
    logits = mx.array([[2.0, 1.8, 0.0]])
    assert Sampler()(logits, meta([params], 3, prompts=[[0]])).token_ids == [1]


def test_logit_bias_by_token_id():
    params = SamplingParams(temperature=0, logit_bias={2: 5.0, 0: -1.0})
    m = meta([params, SamplingParams(temperature=0)], 3)
    logits = mx.array([[1.0, 0.0, -3.0], [1.0, 0.0, -3.0]])
    np.testing.assert_allclose(np.array(adjust_logits(logits, m)), [[0, 0, 2], [1, 0, -3]])
    assert Sampler()(logits, m).token_ids == [2, 0]


def test_bad_token_ids_are_named():
    with pytest.raises(ValueError, match=r"logit_bias.*\[7\]"):
        meta([SamplingParams(logit_bias={7: 1.0})], 5)


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_suppresses_stops_until_reached(ignore_eos):
    params = SamplingParams(min_tokens=2, stop_token_ids=frozenset({1}), ignore_eos=ignore_eos)
    logits = mx.zeros((1, 4))
    for outputs, suppressed in [([], True), ([3], True), ([3, 3], False)]:
        m = meta([params], 4, outputs=[outputs], eos=frozenset({0}))
        inf = np.isinf(np.array(adjust_logits(logits, m))[0])
        assert inf.tolist() == [suppressed and not ignore_eos, suppressed, False, False]


def test_from_requests_reads_the_requests():
    params = SamplingParams(min_tokens=1, repetition_penalty=2.0)
    req = Request("a", [1, 2], params, eos_token_ids=frozenset({0}), output_token_ids=[3])
    m = SamplingMetadata.from_requests([req], 5)
    assert np.array(m.penalties.tokens).tolist() == [[1, 2, 3]]  # prompt + output, distinct
    assert np.array(m.penalties.output_counts).tolist() == [[0, 0, 1]]
    assert m.suppressed is None  # one output token already: min_tokens reached
    assert m.top_p is None and m.logit_bias is None


def seeded_tokens(sampler, logits, params, outputs, position, others):
    """The token of one row placed at ``position`` among ``others`` (params, output) rows."""
    rows = list(others)
    rows.insert(position, (params, outputs))
    picks = [position if i == position else (i * 5 + 1) % 16 for i in range(len(rows))]
    batch = mx.stack([logits if i == position else WIDE[p] for i, p in enumerate(picks)])
    m = meta([p for p, _ in rows], 1000, outputs=[o for _, o in rows])
    return sampler(batch, m).token_ids[position]


OTHERS = [
    (SamplingParams(), []),
    (SamplingParams(temperature=0), [4]),
    (SamplingParams(top_k=20, seed=9), [1, 2]),
    (SamplingParams(top_p=0.5, temperature=1.5), []),
    (SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5), [7, 7]),
    (SamplingParams(min_p=0.1, seed=123), []),
    (SamplingParams(logprobs=3, logit_bias={5: 3.0}), []),
]


@pytest.mark.parametrize(
    "params",
    [SamplingParams(seed=42), SamplingParams(seed=-7, temperature=0.8, top_p=0.9, top_k=100)],
)
def test_seeded_row_is_the_same_alone_and_anywhere_in_a_batch(params):
    for step in range(4):
        outputs = list(range(step))
        alone = Sampler(seed=step)(WIDE[:1], meta([params], 1000, outputs=[outputs])).token_ids[0]
        for position in (0, 3, 7):
            got = seeded_tokens(
                Sampler(seed=100 + position), WIDE[0], params, outputs, position, OTHERS
            )
            assert got == alone, (step, position)


def test_seeds_and_steps_change_the_draw():
    def draw(seed: int, step: int) -> int:
        m = meta([SamplingParams(seed=seed)], 1000, outputs=[[0] * step])
        return Sampler()(WIDE[:1] * 0, m).token_ids[0]  # flat: every token equally likely

    assert len({draw(seed, 0) for seed in range(10)}) > 5
    assert len({draw(5, step) for step in range(10)}) > 5
    assert draw(5, 3) == draw(5, 3)


def test_mixed_batch_gives_each_row_what_it_gives_alone():
    rows = [
        (SamplingParams(temperature=0), [], []),
        (SamplingParams(seed=1, top_k=10), [], []),
        (SamplingParams(temperature=0, repetition_penalty=3.0), list(range(0, 1000, 2)), [1, 3]),
        (SamplingParams(seed=2, presence_penalty=2.0, frequency_penalty=2.0), [], [5, 5, 9]),
        (SamplingParams(seed=3, min_p=0.05, temperature=0.5, logit_bias={17: 100.0}), [], []),
        (SamplingParams(temperature=0, min_tokens=3, stop_token_ids=frozenset({8})), [], []),
    ]
    logits = WIDE[: len(rows)]
    eos = frozenset({int(mx.argmax(WIDE[5]).item())})
    batch_meta = meta(
        [p for p, _, _ in rows],
        1000,
        prompts=[q for _, q, _ in rows],
        outputs=[o for *_, o in rows],
        eos=eos,
    )
    together = Sampler(seed=0)(logits, batch_meta).token_ids
    alone = [
        Sampler(seed=i)(
            logits[i : i + 1], meta([p], 1000, outputs=[o], prompts=[q], eos=eos)
        ).token_ids[0]
        for i, (p, q, o) in enumerate(rows)
    ]
    assert together == alone
    assert together[4] == 17 and together[5] != next(iter(eos))


def test_logprobs_come_from_raw_logits_sorted_descending():
    logits = WIDE[:3]
    params = [
        SamplingParams(logprobs=5, temperature=0.3, repetition_penalty=2.0),
        SamplingParams(),
        SamplingParams(logprobs=0, temperature=0),
    ]
    out = Sampler()(logits, meta(params, 1000, prompts=[[1, 2, 3], [], []]))
    raw = np.array(logits, dtype=np.float64)
    log_softmax = raw - np.log(np.exp(raw).sum(axis=-1, keepdims=True))
    first, none, zero = out.logprobs
    assert none is None
    assert first.token_id == out.token_ids[0]
    assert first.logprob == pytest.approx(log_softmax[0, out.token_ids[0]], abs=1e-4)
    assert first.top_token_ids == np.argsort(-log_softmax[0])[:5].tolist()
    np.testing.assert_allclose(first.top_logprobs, np.sort(log_softmax[0])[::-1][:5], atol=1e-4)
    assert zero.top_token_ids == [] and zero.top_logprobs == []
    assert zero.logprob == pytest.approx(log_softmax[2].max(), abs=1e-4)
