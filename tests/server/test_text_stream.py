"""A stream keeps the text of the special tokens it is told to keep (a tool-call tag that is a
control token) and skips every other special token."""

from __future__ import annotations

import json

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from engine.tokenizer import Tokenizer
from server.text_stream import TextStream
from server.tool_parsers import MistralToolParser


def tokenizer() -> Tokenizer:
    chars = sorted(set('{}[]:,"_ abcdefghijklmnopqrstuvwxyz0123456789'))
    vocab = {("Ġ" if c == " " else c): i for i, c in enumerate(chars)}
    inner = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    inner.add_special_tokens(["</s>", "[TOOL_CALLS]"])
    return Tokenizer(inner, bos_token_id=None, eos_token_id=inner.token_to_id("</s>"))


def test_a_kept_control_token_reaches_the_parser_and_others_do_not():
    tok = tokenizer()
    call = '[{"name": "f", "arguments": {"a": 1}}]'
    tag = tok.encode("[TOOL_CALLS]", add_special_tokens=False)
    assert len(tag) == 1 and tag[0] in tok.all_special_ids
    ids = tok.encode("ok ", add_special_tokens=False) + tag
    ids += tok.encode(call, add_special_tokens=False) + tok.encode("</s>", add_special_tokens=False)

    def text(keep):
        stream = TextStream(tok, [], keep=keep)
        return "".join(stream.add(t) for t in ids) + stream.finish()

    assert text(None) == "ok " + call  # control tokens skipped, as for any reply
    kept = text({tag[0]: "[TOOL_CALLS]"})
    assert kept == "ok [TOOL_CALLS]" + call  # the tag is back; </s> still is not
    parsed = MistralToolParser("list").parse(kept)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [("f", {"a": 1})]
    assert parsed.content.strip() == "ok"
