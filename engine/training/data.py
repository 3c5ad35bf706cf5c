"""Training examples as token ids with a mask of the tokens to learn, and the batches of a run.

A chat example learns only its assistant turns. Each turn's tokens are what the server would
generate for it: the conversation before the turn is rendered with the generation prompt, as a
request's prompt is, and tokenized on its own; the turn's text (the rest of the rendering up to
the end of the turn, end-of-turn marker included) is tokenized after it. So a model trained here
sees at training exactly the token boundaries it sees when serving. A prompt/completion example
learns the completion and the end-of-sequence token.

The order of a run is fixed by its seed: epoch e visits the examples in a permutation drawn from
(seed, e); a step takes the next ``batch_size`` of them (the last step of an epoch may take
fewer) in micro-batches of ``micro_batch_size``. A restarted run recomputes the same order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.tokenizer import Tokenizer


class ExampleError(ValueError):
    """An example that cannot be turned into training tokens; the message says why."""


@dataclass(frozen=True, slots=True)
class Example:
    """tokens: [S] int32; learn: [S] bool, True where the token is one to predict (never the
    first)."""

    tokens: np.ndarray
    learn: np.ndarray

    @property
    def num_learned(self) -> int:
        return int(self.learn[1:].sum())

    def __len__(self) -> int:
        return len(self.tokens)


def chat_example(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]]) -> Example:
    """Learn every assistant message whose ``weight`` is not 0."""
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    pieces: list[tuple[str, bool]] = []
    done = 0  # characters of ``full`` already in pieces
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        turn = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        turn_end = len(turn)
        if not full.startswith(prompt) or len(prompt) < done or turn_end < len(prompt):
            raise ExampleError(
                f"the chat template does not render message {i} after the ones before it "
                "(its rendering of the earlier messages is not a prefix of the whole)"
            )
        pieces.append((full[done : len(prompt)], False))
        pieces.append((full[len(prompt) : turn_end], message.get("weight", 1) != 0))
        done = turn_end
    pieces.append((full[done:], False))
    return _encode(tokenizer, pieces)


def completion_example(tokenizer: Tokenizer, prompt: str, completion: str) -> Example:
    """The prompt as the completions endpoint tokenizes it, then the completion and EOS."""
    tokens = tokenizer.encode(prompt, add_special_tokens=True)
    learned = tokenizer.encode(completion, add_special_tokens=False)
    if tokenizer.eos_token_id is not None:
        learned.append(tokenizer.eos_token_id)
    ids = np.array(tokens + learned, np.int32)
    learn = np.array([False] * len(tokens) + [True] * len(learned))
    return Example(ids, learn)


def _encode(tokenizer: Tokenizer, pieces: list[tuple[str, bool]]) -> Example:
    ids: list[int] = []
    learn: list[bool] = []
    for text, learned in pieces:
        if text:
            piece = tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            learn += [learned] * len(piece)
    if learn:
        learn[0] = False  # nothing predicts the first token
    return Example(np.array(ids, np.int32), np.array(learn, bool))


@dataclass(frozen=True, slots=True)
class RunPlan:
    """Which examples each step of a run takes, in micro-batches."""

    num_examples: int
    n_epochs: int
    batch_size: int
    micro_batch_size: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.num_examples // self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.n_epochs * self.steps_per_epoch

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def micro_batches(self, step: int) -> list[np.ndarray]:
        """The example indices of ``step`` (0-based), in micro-batches."""
        epoch, j = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        chosen = order[j * self.batch_size : (j + 1) * self.batch_size]
        m = self.micro_batch_size
        return [chosen[k : k + m] for k in range(0, len(chosen), m)]


def collate(examples: Sequence[Example]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded tokens [B, S] int32 and learn mask [B, S] float32. Padding comes after
    each sequence's last token, so under causal attention it changes none of its positions."""
    length = max(len(e) for e in examples)
    tokens = np.zeros((len(examples), length), np.int32)
    mask = np.zeros((len(examples), length), np.float32)
    for row, e in enumerate(examples):
        tokens[row, : len(e)] = e.tokens
        mask[row, : len(e)] = e.learn
    return tokens, mask
