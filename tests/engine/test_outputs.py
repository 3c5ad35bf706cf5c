"""RequestOutput.merge: what a caller that fell behind receives in one piece."""

from __future__ import annotations

import pytest

from engine.outputs import RequestOutput, TokenLogprob


def out(ids, **kw) -> RequestOutput:
    return RequestOutput("r", tuple(ids), num_prompt_tokens=7, num_cached_tokens=4, **kw)


def test_merge_concatenates_tokens_and_logprobs_and_takes_the_later_state():
    a = out([1], num_output_tokens=1, logprobs=(TokenLogprob(1, -0.5),), queued_s=0.25)
    b = out([2, 3], num_output_tokens=3, logprobs=(TokenLogprob(2, -1.0), TokenLogprob(3, -2.0)))
    c = out([4], num_output_tokens=4, finished=True, finish_reason="length")
    merged = a.merge(b).merge(c)
    assert merged.new_token_ids == (1, 2, 3, 4)
    assert [lp.token_id for lp in merged.logprobs] == [1, 2, 3]
    assert merged.finished and merged.finish_reason == "length"
    assert (merged.num_output_tokens, merged.queued_s) == (4, 0.25)
    assert (merged.num_prompt_tokens, merged.num_cached_tokens) == (7, 4)


def test_an_abort_after_tokens_keeps_the_counts_and_carries_the_error():
    aborted = RequestOutput("r", (), finished=True, finish_reason="abort", error="boom")
    merged = out([5, 6], num_output_tokens=2).merge(aborted)
    assert merged.new_token_ids == (5, 6) and merged.error == "boom"
    assert (merged.num_output_tokens, merged.num_prompt_tokens, merged.num_cached_tokens) == (
        2,
        7,
        4,
    )


def test_merge_refuses_another_request_or_a_finished_one():
    with pytest.raises(ValueError, match="cannot merge 'x'"):
        out([1]).merge(RequestOutput("x", (2,)))
    with pytest.raises(ValueError, match="already finished"):
        out([1], finished=True, finish_reason="stop").merge(out([2]))
