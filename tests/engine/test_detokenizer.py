"""The incremental detokenizer streams exactly `tokenizer.decode(all_ids)`, never a broken
character, at bounded cost, for a SentencePiece (byte fallback) and a byte-level vocabulary."""

from __future__ import annotations

import random

import pytest

from engine.detokenizer import HARD_LIMIT, LONG_RUN, IncrementalDetokenizer
from engine.tokenizer import Tokenizer
from tests.engine.test_gguf_vocab import vocab_metadata

VOCABS = ["ggml-vocab-llama-spm.gguf", "ggml-vocab-qwen2.gguf"]
TEXTS = [
    "Hello world",
    " leading space and trailing ",
    "  two leading spaces\n\nnew paragraph\n\tindented",
    "naïve café, Grüße, Ångström",
    "中文测试，日本語のテキスト、한국어",
    "emoji 🎉🦙 zwj 👩‍🔬 flag 🇫🇷 end",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and ꙮ and \u0301 lone accent",
    "\n",
]


@pytest.fixture(scope="module", params=VOCABS, ids=["llama-spm", "qwen2"])
def tokenizer(request) -> Tokenizer:
    return Tokenizer.from_gguf(vocab_metadata(request.param))


def stream(
    tokenizer, ids: list[int], skip_special_tokens: bool = False, prompt: list[int] = ()
) -> list[str]:
    """Everything the detokenizer returns for `ids`, `add()` by `add()`, then `flush()`."""
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens, prompt)
    return [*(detokenizer.add(i) for i in ids), detokenizer.flush()]


def check_stream(tokenizer, ids: list[int], skip_special_tokens: bool = False) -> None:
    full = tokenizer.decode(ids, skip_special_tokens)
    pieces = stream(tokenizer, ids, skip_special_tokens)
    emitted = ""
    for piece in pieces[:-1]:
        emitted += piece
        # Never ahead of the final text: in particular no U+FFFD the full decode lacks.
        assert full.startswith(emitted), (emitted, full)
    assert emitted + pieces[-1] == full


@pytest.mark.parametrize("text", TEXTS)
def test_every_prefix_streams_its_full_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    for end in range(len(ids) + 1):
        check_stream(tokenizer, ids[:end])
        check_stream(tokenizer, ids[:end], skip_special_tokens=True)


def test_prompt_context_keeps_the_first_space(tokenizer):
    ids = tokenizer.encode("The capital of France is Paris. 🎉 Vive la 中文!")
    full = tokenizer.decode(ids)
    for cut in range(len(ids) + 1):
        before = tokenizer.decode(ids[:cut])
        if not full.startswith(before):
            continue  # the prompt ends inside a character
        pieces = stream(tokenizer, ids[cut:], prompt=ids[:cut])
        assert "".join(pieces) == full[len(before) :], cut
        assert all("\ufffd" not in piece for piece in pieces)
    paris = tokenizer.encode("The capital of France is Paris")
    assert stream(tokenizer, paris[-1:], prompt=paris[:-1]) == [" Paris", ""]


def test_special_tokens_mid_stream(tokenizer):
    special = sorted(tokenizer.all_special_ids)[:3]
    ids = tokenizer.encode(" First part é")
    ids = [*ids, *special, *tokenizer.encode(" second 🎉 part", add_special_tokens=False)]
    check_stream(tokenizer, ids)
    check_stream(tokenizer, ids, skip_special_tokens=True)


def test_random_token_streams(tokenizer):
    """Garbage (as from random weights) too: stray and truncated byte sequences."""
    rng = random.Random(0)
    vocab = range(min(tokenizer.vocab_size, 32000))
    byte_pieces = [i for i in vocab if tokenizer.id_to_token(i).startswith("<0x")]
    if not byte_pieces:  # byte-level: tokens holding partial UTF-8 sequences
        byte_pieces = [i for i in vocab if "\ufffd" in tokenizer.decode([i])]
    assert byte_pieces
    for _ in range(30):
        ids = [
            rng.choice(byte_pieces) if rng.random() < 0.5 else rng.choice(vocab)
            for _ in range(rng.randrange(1, 40))
        ]
        check_stream(tokenizer, ids)


def test_byte_run_waits_for_its_end_and_long_runs_still_stream():
    llama = Tokenizer.from_gguf(vocab_metadata("ggml-vocab-llama-spm.gguf"))
    byte = {b: 3 + b for b in range(256)}  # <0x00> is id 3
    a = llama.encode("a", add_special_tokens=False)
    # "中" then a stray continuation byte: ByteFallback turns the whole run into U+FFFD, so
    # nothing of the run may be emitted before the run ends.
    ids = [*(byte[b] for b in "中".encode()), byte[0x80], *a]
    pieces = stream(llama, ids)
    assert pieces[:4] == ["", "", "", ""]
    assert "".join(pieces) == llama.decode(ids) == "\ufffd" * 4 + " a"
    # Forty 4-byte characters with no other token between: text streams out before the end,
    # at character boundaries only.
    text = "𝔘" * 40
    ids = [byte[b] for b in text.encode()]
    pieces = stream(llama, ids)
    assert "".join(pieces) == text and "".join(pieces[:-1]) != ""
    assert all("\ufffd" not in piece for piece in pieces)
    assert max(i for i, piece in enumerate(pieces) if piece) > LONG_RUN


class CountingTokenizer:
    """Records the longest decode, to show the cost per token does not grow with the stream."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner, self.longest = inner, 0

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids, skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.inner.id_to_token(token_id)


def test_cost_per_token_is_bounded(tokenizer):
    ids = tokenizer.encode(" ".join(TEXTS) * 20)
    counting = CountingTokenizer(tokenizer)
    detokenizer = IncrementalDetokenizer(counting)
    text = "".join(detokenizer.add(i) for i in ids) + detokenizer.flush()
    assert text == tokenizer.decode(ids)
    assert len(ids) > 1000 and counting.longest <= 2 * HARD_LIMIT
    garbage = [tokenizer.encode("é", add_special_tokens=False)[-1]] * 500  # never completes
    detokenizer = IncrementalDetokenizer(counting)
    text = "".join(detokenizer.add(i) for i in garbage) + detokenizer.flush()
    assert text == tokenizer.decode(garbage) and counting.longest <= 2 * HARD_LIMIT
