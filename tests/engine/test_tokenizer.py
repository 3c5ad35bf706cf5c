"""The engine Tokenizer from a GGUF file and from a Hugging Face folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.chat_template import ChatTemplateError
from engine.tokenizer import Tokenizer
from tests.engine.test_chat_template import CHATML, LLAMA2
from tests.engine.test_gguf_vocab import vocab_metadata

USER = [{"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return Tokenizer.from_gguf(vocab_metadata("smollm2"))


@pytest.fixture(scope="module")
def stories() -> Tokenizer:
    return Tokenizer.from_gguf(vocab_metadata("stories260K"))


def test_smollm2_special_tokens(smollm2):
    assert (smollm2.bos_token, smollm2.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (smollm2.bos_token_id, smollm2.eos_token_ids) == (1, frozenset({0, 2}))
    assert smollm2.vocab_size == 49152
    assert smollm2.all_special_ids == frozenset(range(17))  # the file's control tokens
    assert smollm2.encode("Hi") == smollm2.encode("Hi", add_special_tokens=False)  # no BOS
    assert smollm2.id_to_token(905) == "Ġworld"


def test_smollm2_chat_encodes_the_rendered_template_once(smollm2):
    text = smollm2.apply_chat_template(USER)
    assert text == smollm2.apply_chat_template(USER, add_generation_prompt=False) + (
        "<|im_start|>assistant\n"
    )
    ids = smollm2.encode_chat(USER)
    assert ids == smollm2.encode(text, add_special_tokens=False)
    assert ids.count(1) == 3 and ids.count(2) == 2  # three turns opened, two closed
    tail = smollm2.encode("assistant\n")
    assert ids[-1 - len(tail) :] == [1, *tail]
    assert smollm2.decode(ids) == text
    assert smollm2.decode(ids, skip_special_tokens=True).endswith("user\nHi there\nassistant\n")


def test_gguf_llama_vocab_bos_and_missing_template(stories):
    ids = stories.encode("Once upon a time")
    assert ids[0] == stories.bos_token_id == 1 and ids.count(1) == 1
    assert stories.decode(ids, skip_special_tokens=True) == "Once upon a time"
    assert stories.decode(ids) == "<s> Once upon a time"  # as transformers' Llama decodes
    assert stories.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        stories.encode_chat(USER)


def write_folder(
    folder: Path,
    stories: Tokenizer,
    config: dict | None = None,
    generation: dict | None = None,
    jinja: str | None = None,
) -> Path:
    """A Hugging Face tokenizer folder whose tokenizer.json is stories260K's vocabulary."""
    folder.mkdir()
    stories.backend.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    if jinja is not None:
        (folder / "chat_template.jinja").write_text(jinja)
    return folder


def test_folder_tokens_as_strings_or_dicts_and_eos_lists(stories, tmp_path):
    config = {
        "bos_token": {"content": "<s>", "lstrip": False, "special": True},
        "eos_token": "</s>",
        "chat_template": LLAMA2,
    }
    folder = write_folder(tmp_path / "m", stories, config, {"eos_token_id": [2, 7]})
    tokenizer = Tokenizer.from_folder(folder)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer.eos_token_ids == frozenset({2, 7})
    assert {1, 2, 7} <= tokenizer.all_special_ids
    assert tokenizer.encode("Once") == stories.encode("Once")  # tokenizer.json adds BOS
    ids = tokenizer.encode_chat(USER)
    assert ids[0] == 1 and ids.count(1) == 1  # the template's BOS, not a second one
    # Text after a special token gets the SentencePiece space prefix again (llama.cpp does too).
    assert tokenizer.decode(ids) == "<s> [INST] Hi there [/INST]"


def test_folder_add_bos_and_add_eos_flags(stories, tmp_path):
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False}
    folder = write_folder(tmp_path / "a", stories, config)
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 5}))  # no generation config
    plain = Tokenizer.from_folder(folder)
    assert plain.encode("Once") == stories.encode("Once", add_special_tokens=False)
    assert plain.eos_token_ids == frozenset({2, 5})
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_eos_token": True}
    both = Tokenizer.from_folder(write_folder(tmp_path / "b", stories, config, {"eos_token_id": 2}))
    assert both.encode("Once") == [*stories.encode("Once"), 2]
    assert both.eos_token_ids == frozenset({2})


def test_folder_chat_template_sources(stories, tmp_path):
    named = [{"name": "tool_use", "template": "tools!"}, {"name": "default", "template": CHATML}]
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": named}
    listed = Tokenizer.from_folder(write_folder(tmp_path / "a", stories, config))
    assert listed.chat_template == CHATML
    jinja = Tokenizer.from_folder(write_folder(tmp_path / "b", stories, config, jinja="J{{ 1 }}"))
    assert jinja.apply_chat_template(USER) == "J1"  # chat_template.jinja wins
    bare = Tokenizer.from_folder(write_folder(tmp_path / "c", stories, {}))
    assert (bare.chat_template, bare.bos_token_id, bare.eos_token_ids) == (None, None, frozenset())


def test_folder_errors(stories, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_folder(tmp_path)
    folder = write_folder(tmp_path / "m", stories, {"bos_token": "<nope>"})
    with pytest.raises(ValueError, match="<nope>"):
        Tokenizer.from_folder(folder)
