"""Training examples and the interleaving policy. A chat example learns exactly the tokens
transformers marks as assistant tokens (``return_assistant_tokens_mask`` over a template with
``{% generation %}`` spans); its prompt tokens are what serving would send for the same turn."""

from __future__ import annotations

import numpy as np
import pytest

from engine.background import Background, InterleavePolicy
from engine.stats import EngineStats
from engine.tokenizer import Tokenizer
from engine.training.data import RunPlan, chat_example, collate, completion_example
from tests.server.fixtures import write_tiny_model

transformers = pytest.importorskip("transformers")

MARKED = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>\n"
    "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Colour of the sky?"},
    {"role": "assistant", "content": "Blue, mostly."},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("data") / "tiny")


def test_chat_masks_equal_transformers_assistant_masks(folder):
    ours = Tokenizer.from_folder(folder)
    ours.chat_template = MARKED
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    out = hf.apply_chat_template(
        CONVERSATION, chat_template=MARKED, tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True,
    )  # fmt: skip
    example = chat_example(ours, CONVERSATION)
    assert example.tokens.tolist() == out["input_ids"]
    assert example.learn.tolist() == [bool(m) for m in out["assistant_masks"]]
    assert example.num_learned == len("Hello!") + len("Blue, mostly.") + 2 * 2


def test_prompt_tokens_are_what_serving_sends_and_weight_zero_is_not_learned(folder):
    tok = Tokenizer.from_folder(folder)
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["weight"] = 0
    example = chat_example(tok, messages)
    prompt = tok.encode_chat(CONVERSATION[:4], add_generation_prompt=True)
    assert example.tokens[: len(prompt)].tolist() == prompt
    assert not example.learn[: len(prompt)].any() and example.learn[len(prompt) :].sum() > 0

    plain = completion_example(tok, "2+2=", "4")
    assert plain.learn.tolist() == [False] * 4 + [True, True]  # "4" and EOS


def test_run_plan_visits_every_example_once_an_epoch_and_collate_pads_right():
    plan = RunPlan(num_examples=10, n_epochs=2, batch_size=4, micro_batch_size=3, seed=5)
    assert plan.total_steps == 6
    for epoch in range(2):
        seen = [i for s in range(3) for b in plan.micro_batches(epoch * 3 + s) for i in b]
        assert sorted(seen) == list(range(10))
    assert [len(b) for b in plan.micro_batches(0)] == [3, 1]
    assert [len(b) for b in plan.micro_batches(2)] == [2]
    from engine.training.data import Example

    tokens, mask = collate([Example(np.array([5, 6, 7]), np.array([0, 1, 1], bool)),
                            Example(np.array([8]), np.array([0], bool))])  # fmt: skip
    assert tokens.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[0, 1, 1], [0, 0, 0]]


class Counting:
    def __init__(self, units: int) -> None:
        self.left, self.ran = units, 0

    def run_unit(self) -> bool:
        self.ran += 1
        self.left -= 1
        return self.left > 0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_interleave_policy():
    bg = Background(InterleavePolicy(serve_steps=3), clock=Clock())  # units take no time
    work = Counting(100)
    bg.add(work)
    idle, busy, full = EngineStats(), EngineStats(num_running=2), EngineStats(num_waiting=1)
    for _ in range(4):
        bg.after_step(idle, stepped=False)
    assert work.ran == 4  # idle: back to back
    for _ in range(9):
        bg.after_step(busy, stepped=True)
    assert work.ran == 7  # one unit after every 3 serving steps
    for _ in range(10):
        bg.after_step(full, stepped=True)
    assert work.ran == 7  # requests waiting: serving first
    short = Counting(1)
    bg2 = Background()
    bg2.add(short)
    bg2.after_step(idle, stepped=False)
    assert short.ran == 1 and not bg2.pending


class Slow(Counting):
    """Units that take ``seconds`` each on ``clock``."""

    def __init__(self, units: int, clock: Clock, seconds: float) -> None:
        super().__init__(units)
        self.clock, self.seconds = clock, seconds

    def run_unit(self) -> bool:
        self.clock.now += self.seconds
        return super().run_unit()


def test_interleave_policy_keeps_servings_share_of_time():
    """Units of 2 s between steps of 0.125 s: with serving's share at 2/3, a unit waits for 4 s
    of serving (32 steps) after the last, not 3 steps; with share 0, for the steps alone."""
    clock = Clock()
    busy = EngineStats(num_running=16)
    for share, between in ((2 / 3, 32), (0.0, 3)):
        bg = Background(InterleavePolicy(serve_steps=3, serve_share=share), clock=clock)
        work = Slow(100, clock, seconds=2.0)
        bg.add(work)
        bg.after_step(EngineStats(), stepped=False)  # idle: a unit at once
        assert work.ran == 1
        steps = 0
        while work.ran == 1:
            clock.now += 0.125
            steps += 1
            bg.after_step(busy, stepped=True)
        assert steps == between
    with pytest.raises(ValueError, match="serve_share"):
        InterleavePolicy(serve_share=1.0)


def test_no_unit_starts_in_the_moment_a_batch_ends():
    """Clients send their next requests right after a batch finishes: units wait until nothing
    has been served for ``idle_grace`` seconds."""
    clock = Clock()
    bg = Background(InterleavePolicy(idle_grace=0.25), clock=clock)
    work = Slow(100, clock, seconds=2.0)
    bg.add(work)
    bg.after_step(EngineStats(num_running=16), stepped=True)
    bg.after_step(EngineStats(), stepped=False)  # the batch just ended
    clock.now += 0.125
    bg.after_step(EngineStats(), stepped=False)
    assert work.ran == 0
    clock.now += 0.125
    bg.after_step(EngineStats(), stepped=False)
    assert work.ran == 1


def test_the_engine_rests_only_in_the_idle_grace(monkeypatch):
    """While a unit waits its turn, a serving step goes straight on to the next; only an idle
    loop inside the grace rests (instead of spinning)."""
    import engine.background as background

    rests: list[float] = []
    monkeypatch.setattr(background.time, "sleep", rests.append)
    clock = Clock()
    bg = Background(InterleavePolicy(serve_steps=3, idle_grace=0.25), clock=clock)
    bg.add(Slow(100, clock, seconds=2.0))
    for _ in range(2):  # not due yet: fewer than serve_steps steps
        bg.after_step(EngineStats(num_running=4), stepped=True)
    assert rests == []
    bg.after_step(EngineStats(), stepped=False)  # the batch just ended: inside the grace
    assert rests == [background.GRACE_POLL]
