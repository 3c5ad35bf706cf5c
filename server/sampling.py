"""A request's sampling fields → the engine's ``SamplingParams``: the model's defaults filled in,
every value checked, token ids checked against the vocabulary.

The one place sampling fields are understood, whichever API they came from: a new way to
shape sampling (a grammar, a token mask) is a field of ``GenerationRequest`` read here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.sampling_params import SamplingParams
from server.errors import BadRequest
from server.generation import GenerationRequest


def sampling_params(
    spec: GenerationRequest, max_tokens: int, defaults: Mapping[str, Any], vocab_size: int
) -> SamplingParams:
    """``defaults`` are the model's (generation_config.json); a field the request leaves None
    takes the model's value, else OpenAI's."""
    d = defaults
    bias = {}
    for key, value in spec.logit_bias.items():
        try:
            bias[int(key)] = float(value)
        except ValueError:
            raise BadRequest(f"logit_bias key {key!r} is not a token id", "logit_bias") from None
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=spec.min_tokens,
            temperature=_pick(spec.temperature, d.get("temperature"), 1.0),
            top_p=_pick(spec.top_p, d.get("top_p"), 1.0),
            top_k=_pick(spec.top_k, d.get("top_k"), 0),
            min_p=_pick(spec.min_p, d.get("min_p"), 0.0),
            presence_penalty=spec.presence_penalty,
            frequency_penalty=spec.frequency_penalty,
            repetition_penalty=_pick(spec.repetition_penalty, d.get("repetition_penalty"), 1.0),
            logit_bias=bias,
            seed=spec.seed,
            stop_token_ids=frozenset(spec.stop_token_ids),
            ignore_eos=spec.ignore_eos,
            logprobs=spec.logprobs,
        )
    except ValueError as e:
        raise BadRequest(str(e)) from None
    bad = [t for t in [*bias, *params.stop_token_ids] if not 0 <= t < vocab_size]
    if bad:
        raise BadRequest(f"token ids out of range [0, {vocab_size}): {bad[:10]}")
    return params


def _pick(value, default, fallback):
    if value is not None:
        return value
    return default if default is not None else fallback
