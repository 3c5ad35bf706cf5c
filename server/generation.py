"""What every API hands the serving core, and what the core hands back: a protocol-neutral
request, the validated form of it, and the typed events of its generation.

An API module (OpenAI chat, completions, and those to come) translates its wire request into a
``GenerationRequest`` and the events below into its wire shapes; nothing in between knows which
API asked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams
from engine.structured.grammar import GrammarSpec

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One request in no API's words: a tokenized prompt, how to sample, when to stop.

    ``None`` in a sampling field means "the model's default" (its generation_config.json),
    falling back to OpenAI's. ``prompt_field`` and ``max_tokens_field`` are the wire fields an
    error about the prompt's or the output's length names.
    """

    model: str | None
    prompt_ids: list[int]
    id_prefix: str  # "chatcmpl", "cmpl": begins the id every body and chunk of the answer carries
    prompt_field: str = "prompt"
    max_tokens: int | None = None  # None: as many as the context leaves room for
    max_tokens_field: str = "max_tokens"
    n: int = 1
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k: the chosen token's and k alternatives
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    logit_bias: Mapping[str, float] = field(default_factory=dict)  # token id (as JSON writes it)
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    grammar: GrammarSpec | None = None  # the output must match it (structured output)
    grammar_field: str | None = None  # the wire field that asked for it, for errors
    more_prompts: tuple[list[int], ...] = ()  # a batch of prompts: n choices of each, in order
    keep_tokens: tuple[tuple[int, str], ...] = ()  # special tokens whose text the output keeps


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A validated request, ready for the engine: ``n`` choices of each of its prompts.

    ``model`` is the name responses and metrics carry (the base model's served name, or the
    adapter's); ``adapter`` names the adapter to pin at admission, None for the base model.
    Choice ``i`` continues prompt ``i // n`` (OpenAI's order for a batch of prompts).
    """

    request_id: str
    model: str
    adapter: str | None
    prompts: tuple[list[int], ...]
    params: SamplingParams
    n: int
    stop: tuple[str, ...]
    grammar: GrammarSpec | None = None  # compiled and checked; each choice gets a matcher
    keep_tokens: tuple[tuple[int, str], ...] = ()  # special tokens whose text the output keeps

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    @property
    def prompt_ids(self) -> list[int]:
        """The first (usually the only) prompt."""
        return self.prompts[0]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


# -- the events of a generation, in the order they come ------------------------------------------


@dataclass(slots=True)
class ChoiceDelta:
    """What choice ``index`` produced since its previous delta.

    ``text`` is safe to show: cut at the first stop string, and never showing the start of a
    stop string before it is known whether the stop string follows. ``token_ids`` are every
    token the engine produced (a stop token id included, which ``text`` leaves out), each with
    its entry in ``logprobs`` when logprobs were asked for. ``finish_reason`` is set on the
    choice's last delta, and only there; ``stop_string`` too, when one of the request's stop
    strings ended the choice.
    """

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_string: str | None = None


@dataclass(slots=True)
class TokenUsage:
    """The last event, once every choice has finished: the token counts of the request."""

    prompt_tokens: int
    completion_tokens: int  # all choices together
    cached_tokens: int  # prompt tokens served from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


GenerationEvent = ChoiceDelta | TokenUsage
