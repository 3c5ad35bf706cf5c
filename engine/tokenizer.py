"""The engine's tokenizer: text <-> token ids, special tokens, and the chat template.

One class whatever the source. A Hugging Face folder brings a tokenizer.json and the special
tokens and template live in tokenizer_config.json; a GGUF file brings llama.cpp's metadata,
which `engine.loader.gguf_vocab` turns into the same `tokenizers.Tokenizer`. Everything above
(serving, the detokenizer) sees only this class.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from engine.chat_template import ChatTemplateError, compile_chat_template
from engine.loader.gguf_vocab import bos_eos_processor, load_gguf_vocab


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what the engine needs around it.

    Invariants: `eos_token_ids` holds every id that ends generation (the tokenizer's EOS and any
    the generation config adds); `bos_token_id` is None when the model has no BOS token.
    """

    __slots__ = ("_inner", "bos_token_id", "chat_template", "eos_token_id", "eos_token_ids")

    def __init__(
        self,
        inner: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        extra_eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
    ) -> None:
        self._inner = inner
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        eos = {eos_token_id} if eos_token_id is not None else set()
        self.eos_token_ids: frozenset[int] = frozenset(eos | set(extra_eos_token_ids))
        self.chat_template = chat_template

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """A Hugging Face model folder: tokenizer.json, tokenizer_config.json,
        chat_template.jinja, generation_config.json (or config.json) for extra EOS ids."""
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.json")
        inner = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        # Some tokenizer.json files fix a padding and truncation length (BERT exports pad to
        # 128): an encoding is exactly the text's tokens; callers decide lengths.
        inner.no_padding()
        inner.no_truncation()
        config = _read_json(folder / "tokenizer_config.json")
        bos = _token_id(inner, config.get("bos_token"), "bos_token")
        eos = _token_id(inner, config.get("eos_token"), "eos_token")
        _apply_add_special_flags(inner, config, bos, eos)

        # generate() stops on generation_config's eos_token_id (one id or a list), falling back
        # to the model config's; chat models list their end-of-turn token there.
        generation = _read_json(folder / "generation_config.json") or _read_json(
            folder / "config.json"
        )
        extra_eos = generation.get("eos_token_id")
        extra_eos = extra_eos if isinstance(extra_eos, list) else [extra_eos]
        template_file = folder / "chat_template.jinja"
        if template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        else:
            template = _pick_template(config.get("chat_template"))
        return cls(
            inner,
            bos_token_id=bos,
            eos_token_id=eos,
            extra_eos_token_ids=[i for i in extra_eos if isinstance(i, int)],
            chat_template=template,
        )

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """From `engine.loader.gguf_metadata.read_metadata()`'s dict."""
        vocab = load_gguf_vocab(metadata)
        return cls(
            vocab.tokenizer,
            bos_token_id=vocab.bos_token_id,
            eos_token_id=vocab.eos_token_id,
            extra_eos_token_ids=vocab.end_token_ids,
            chat_template=vocab.chat_template,
        )

    # --- tokens -------------------------------------------------------------------------------

    def encode(
        self, text: str, add_special_tokens: bool = True, max_length: int | None = None
    ) -> list[int]:
        """Special tokens written in `text` (e.g. `<|im_start|>`) are matched whole, as in
        transformers; `add_special_tokens` only controls the BOS/EOS the tokenizer adds.
        `max_length` truncates as transformers does: the text's tokens are cut at the end so
        that, with the special tokens added, at most that many remain."""
        if max_length is None:
            return self._inner.encode(text, add_special_tokens=add_special_tokens).ids
        encoding = self._inner.encode(text, add_special_tokens=False)
        added = self._inner.num_special_tokens_to_add(False) if add_special_tokens else 0
        encoding.truncate(max(max_length - added, 0))
        return self._inner.post_process(encoding, None, add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._inner.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary piece (e.g. "Ġworld", "<0x0A>"), not its text."""
        return self._inner.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        return self._inner.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self._piece(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._piece(self.eos_token_id)

    @property
    def all_special_ids(self) -> frozenset[int]:
        """Added tokens marked special, plus BOS and every EOS id."""
        special = {i for i, tok in self._inner.get_added_tokens_decoder().items() if tok.special}
        if self.bos_token_id is not None:
            special.add(self.bos_token_id)
        return frozenset(special | self.eos_token_ids)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer` (for saving it, or handing it to transformers)."""
        return self._inner

    # --- chat ---------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages`; `kwargs` (e.g. `tools`) go to the template."""
        if self.chat_template is None:
            raise ChatTemplateError(
                "this model has no chat template; use the completions endpoint with a raw prompt"
            )
        return compile_chat_template(self.chat_template).render(
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> list[int]:
        """Render, then encode without adding BOS/EOS: the template writes BOS itself where the
        model wants it, so adding it again would double it (transformers does the same)."""
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)

    def _piece(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._inner.id_to_token(token_id)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_id(inner: tokenizers.Tokenizer, token: Any, name: str) -> int | None:
    """tokenizer_config.json spells a special token as a string or an AddedToken dict."""
    if isinstance(token, dict):
        token = token.get("content")
    if token is None:
        return None
    token_id = inner.token_to_id(str(token))
    if token_id is None:
        raise ValueError(f"tokenizer_config.json {name} {token!r} is not in the vocabulary")
    return token_id


def _pick_template(template: Any) -> str | None:
    """A string, or transformers' list of named templates, of which we serve "default"."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default")
    return template if isinstance(template, str) else None


def _apply_add_special_flags(
    inner: tokenizers.Tokenizer, config: Mapping[str, Any], bos: int | None, eos: int | None
) -> None:
    """Honour `add_bos_token` / `add_eos_token` when the config states them.

    tokenizer.json's post-processor is usually right already; we only replace it (as
    transformers' Llama tokenizer does) when it disagrees with an explicit flag.
    """
    if "add_bos_token" not in config and "add_eos_token" not in config:
        return
    added = inner.encode("", add_special_tokens=True).ids
    has_bos = bos is not None and added[:1] == [bos]
    has_eos = eos is not None and added[-1:] == [eos]
    want_bos = bool(config.get("add_bos_token", has_bos)) and bos is not None
    want_eos = bool(config.get("add_eos_token", has_eos)) and eos is not None
    if (want_bos, want_eos) == (has_bos, has_eos):
        return
    inner.post_processor = bos_eos_processor(
        (inner.id_to_token(bos), bos) if want_bos and bos is not None else None,
        (inner.id_to_token(eos), eos) if want_eos and eos is not None else None,
    )
