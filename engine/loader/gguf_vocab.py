"""A Hugging Face `tokenizers.Tokenizer` rebuilt from a GGUF file's tokenizer metadata.

A GGUF carries no tokenizer.json, only llama.cpp's description of one: the pieces, their scores
and types, the BPE merges and a `pre` name for the split rules. Rebuilding it as a `tokenizers`
object lets the rest of the engine treat GGUF and Hugging Face folders alike. The target is
llama.cpp's token ids: the tests hold this file to llama.cpp's own test vectors.

Two vocabulary kinds are supported:
- `llama`: SentencePiece BPE. There are no merges in the file; they are recovered from the
  scores (a merge ranks by the score of the piece it makes, which is how SentencePiece picks the
  next pair). A space prefix is prepended to every run of text (after each special token too,
  as llama.cpp does) and characters outside the vocabulary fall back to `<0xXX>` byte pieces.
- `gpt2`: byte-level BPE with the merges from the file and the split regex named by `pre`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.processors import TemplateProcessing

logger = logging.getLogger(__name__)

SPACE = "\u2581"  # SentencePiece's visible space, "▁"


class TokenType(IntEnum):
    """llama.cpp's `tokenizer.ggml.token_type` values."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Split regexes, as the Hugging Face tokenizer.json files of these families spell them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_SPLITS = {"llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}

# `pre` name -> split family. "gpt2" is ByteLevel's built-in GPT-2 regex; "digits" puts every
# digit in its own piece first (llama.cpp groups SmolLM with StarCoder, Refact, Command-R...).
_PRE_FAMILIES = {
    "default": "gpt2",
    "gpt2": "gpt2",
    "gpt-2": "gpt2",
    "mpt": "gpt2",
    "olmo": "gpt2",
    "jais": "gpt2",
    "smollm": "digits",
    "starcoder": "digits",
    "refact": "digits",
    "command-r": "digits",
    "codeshell": "digits",
    "exaone": "digits",
    "minerva-7b": "digits",
    "qwen2": "qwen2",
    "stablelm2": "qwen2",
    "deepseek-r1-qwen": "qwen2",
    "megrez": "qwen2",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "llama-bpe": "llama3",
    "falcon3": "llama3",
    "smaug-bpe": "llama3",
    "dbrx": "llama3",
    "pixtral": "llama3",
}

# Control tokens that end a turn in common chat formats; llama.cpp stops on them too.
_END_OF_TURN = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
)


@dataclass(slots=True, frozen=True)
class GGUFVocab:
    """Everything a GGUF file says about tokens, in the shape `engine.tokenizer` wants."""

    tokenizer: Tokenizer
    bos_token_id: int | None
    eos_token_id: int | None
    end_token_ids: frozenset[int]  # eos plus eot/eom and end-of-turn control tokens
    chat_template: str | None


def load_gguf_vocab(metadata: Mapping[str, Any]) -> GGUFVocab:
    """Tokenizer, special ids and chat template from `read_metadata()`'s dict."""
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    types = _types(metadata)
    eos = _token_id(metadata, "eos", len(tokens))
    ends = {eos} if eos is not None else set()
    for key in ("eot", "eom"):
        if (token_id := _token_id(metadata, key, len(tokens))) is not None:
            ends.add(token_id)
    for token_id, token_type in enumerate(types):
        if token_type == TokenType.CONTROL and tokens[token_id] in _END_OF_TURN:
            ends.add(token_id)
    return GGUFVocab(
        tokenizer=build_tokenizer(metadata),
        bos_token_id=_token_id(metadata, "bos", len(tokens)),
        eos_token_id=eos,
        end_token_ids=frozenset(ends),
        chat_template=metadata.get("tokenizer.chat_template"),
    )


def build_tokenizer(metadata: Mapping[str, Any]) -> Tokenizer:
    """The `tokenizers.Tokenizer` that reproduces llama.cpp's ids for this vocabulary."""
    model = metadata.get("tokenizer.ggml.model")
    if model == "llama":
        tokenizer = _sentencepiece_bpe(metadata)
        add_bos_default = True
    elif model == "gpt2":
        tokenizer = _byte_level_bpe(metadata)
        add_bos_default = False
    else:
        raise ValueError(
            f"GGUF tokenizer model {model!r} is not supported (supported: 'llama', 'gpt2')"
        )
    _add_special_tokens(tokenizer, metadata)
    _set_post_processor(tokenizer, metadata, add_bos_default)
    return tokenizer


def _sentencepiece_bpe(metadata: Mapping[str, Any]) -> Tokenizer:
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    scores: list[float] = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = _types(metadata)
    vocab = _vocab(tokens)
    unk_id = _token_id(metadata, "unknown", len(tokens))
    unk = tokens[unk_id] if unk_id is not None else None
    mergeable = {
        token: i
        for i, token in enumerate(tokens)
        if types[i] in (TokenType.NORMAL, TokenType.UNDEFINED) and vocab[token] == i
    }
    bpe = BPE(
        vocab,
        sentencepiece_merges(mergeable, scores),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(bpe)
    steps = [normalizers.Replace(" ", SPACE)]
    if metadata.get("tokenizer.ggml.add_space_prefix", True):
        # A normalizer runs on each run of text between special tokens, so each run gets its
        # prefix, as in llama.cpp. Metaspace would skip text that already starts with a space.
        steps.insert(0, normalizers.Prepend(SPACE))
        strip = [decoders.Strip(" ", 1, 0)]
    else:
        strip = []
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    return tokenizer


def sentencepiece_merges(pieces: Mapping[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces, best merged score first.

    SentencePiece BPE encodes by repeatedly merging the adjacent pair whose concatenation is the
    highest-scoring piece; ranking merges that way makes `tokenizers`' BPE do the same. Ties keep
    the merged piece's id order, then the left piece's.
    """
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, piece_id in pieces.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in pieces and right in pieces:
                ranked.append((-scores[piece_id], piece_id, pieces[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _byte_level_bpe(metadata: Mapping[str, Any]) -> Tokenizer:
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges", [])]
    pre = metadata.get("tokenizer.ggml.pre", "default")
    family = _PRE_FAMILIES.get(pre)
    if family is None:
        logger.warning(
            "GGUF tokenizer.ggml.pre %r is unknown; splitting text with the GPT-2 regex, "
            "so some texts may tokenize differently from the model's own tokenizer",
            pre,
        )
        family = "gpt2"
    # Llama 3 looks a whole split piece up before merging (tokenizer.json's ignore_merges).
    tokenizer = Tokenizer(BPE(_vocab(tokens), merges, ignore_merges=family == "llama3"))
    tokenizer.pre_tokenizer = _split_rules(family)
    if family == "qwen2":
        tokenizer.normalizer = normalizers.NFC()  # as Qwen2's tokenizer.json; llama.cpp skips it
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _split_rules(family: str) -> pre_tokenizers.PreTokenizer:
    """How text is cut before BPE, then spelled in GPT-2's printable byte alphabet."""
    if family in _SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[family]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if family == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    return gpt2


def _add_special_tokens(tokenizer: Tokenizer, metadata: Mapping[str, Any]) -> None:
    """Control and unknown pieces become special tokens, user-defined ones plain added tokens.

    Both are matched whole in raw text before the model sees it, as llama.cpp does. Their ids
    stay the file's, because each content string is already in the model's vocabulary.
    """
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    types = _types(metadata)
    special, plain = [], []
    for token, token_type in zip(tokens, types, strict=True):
        if not token:
            continue  # an empty piece cannot be matched in text
        if token_type in (TokenType.CONTROL, TokenType.UNKNOWN):
            special.append(AddedToken(token, special=True, normalized=False))
        elif token_type == TokenType.USER_DEFINED:
            plain.append(AddedToken(token, special=False, normalized=False))
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(plain)


def _set_post_processor(
    tokenizer: Tokenizer, metadata: Mapping[str, Any], add_bos_default: bool
) -> None:
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    bos = _token_id(metadata, "bos", len(tokens))
    eos = _token_id(metadata, "eos", len(tokens))
    add_bos = bos is not None and metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)
    add_eos = eos is not None and metadata.get("tokenizer.ggml.add_eos_token", False)
    processor = bos_eos_processor(
        (tokens[bos], bos) if add_bos else None, (tokens[eos], eos) if add_eos else None
    )
    if processor is not None:
        tokenizer.post_processor = processor


def bos_eos_processor(
    bos: tuple[str, int] | None, eos: tuple[str, int] | None
) -> TemplateProcessing | None:
    """A post-processor that wraps each encoding in BOS/EOS, given as (piece, id); None if
    neither is wanted."""
    specials = [token for token in (bos, eos) if token is not None]
    if not specials:
        return None
    single = [*(bos[:1] if bos else ()), "$A", *(eos[:1] if eos else ())]
    pair = [*single, *("$B:1" if piece == "$A" else piece for piece in single)]
    return TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _vocab(tokens: list[str]) -> dict[str, int]:
    """Piece -> id; a piece listed twice keeps its first id."""
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    return vocab


def _types(metadata: Mapping[str, Any]) -> list[int]:
    """Each piece's `TokenType`; files without the key hold only normal pieces."""
    count = len(metadata["tokenizer.ggml.tokens"])
    return metadata.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * count


def _token_id(metadata: Mapping[str, Any], name: str, vocab_size: int) -> int | None:
    """`tokenizer.ggml.<name>_token_id`, or None when absent or out of range (-1 as uint32)."""
    value = metadata.get(f"tokenizer.ggml.{name}_token_id")
    return value if isinstance(value, int) and 0 <= value < vocab_size else None
