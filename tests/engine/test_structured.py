"""Constrained decoding with llguidance: a random-weight tiny model at temperature 1 produces
output that its schema (checked by ``jsonschema``) or grammar accepts, alone and batched with
unconstrained requests, whose tokens do not change."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from engine.structured.grammar import GrammarCompiler, GrammarError, GrammarSpec
from tests.engine.tiny_models import build_tiny

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("torch")
SCHEMAS = json.loads((Path(__file__).parent / "data" / "schemas.json").read_text())
EOS = 0


def char_tokenizer():
    """One token per printable ASCII character (byte-level, as GPT-2's), and </s> as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    table = _bytes_to_unicode()
    vocab = {"</s>": EOS}
    for b in range(32, 127):
        vocab[table[b]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["</s>"])
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from engine.loader.hf import load_hf_model

    tok = char_tokenizer()
    vocab = tok.get_vocab_size()
    folder = tmp_path_factory.mktemp("charllama")
    build_tiny("llama", folder, vocab_size=vocab, bos_token_id=EOS, eos_token_id=EOS)
    model = load_hf_model(folder, mx.float32)
    compiler = GrammarCompiler(tok.to_str(), vocab, [EOS])
    return model, tok, compiler


def engine(model, **kw) -> EngineCore:
    config = EngineConfig(**{"num_blocks": 4096, "block_size": 16, "max_num_seqs": 128, **kw})
    return EngineCore(model, config, mx.float32)


def drive(core: EngineCore, requests: list[EngineRequest], max_steps: int = 5000):
    """{id: (token ids, finish reason)} once every request is done."""
    for r in requests:
        core.add_request(r)
    tokens = {r.request_id: [] for r in requests}
    finish = {}
    for _ in range(max_steps):
        if not core.has_work:
            break
        for out in core.step():
            assert out.error is None, out.error
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finished:
                finish[out.request_id] = out.finish_reason
    assert not core.has_work, "engine did not finish"
    return {rid: (tokens[rid], finish[rid]) for rid in tokens}


def text_of(tok, ids: list[int]) -> str:
    return tok.decode([t for t in ids if t != EOS])


def sampled(seed: int, max_tokens: int = 400) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed)


def prompt_for(i: int) -> list[int]:
    return np.random.default_rng(i).integers(1, 96, size=8).tolist()


def test_forty_schemas_five_seeds_validate_batched_with_free_rows(world):
    model, tok, compiler = world
    assert len(SCHEMAS) >= 40
    free = [
        EngineRequest(f"free{i}", prompt_for(1000 + i), sampled(i, 30), eos_token_ids={EOS})
        for i in range(4)
    ]
    alone = drive(engine(model), free)
    constrained = [
        EngineRequest(
            f"s{i}-{seed}",
            prompt_for(i),
            sampled(seed),
            eos_token_ids=frozenset({EOS}),
            constraint=compiler.constraint(GrammarSpec.json_schema(schema)),
        )
        for i, schema in enumerate(SCHEMAS)
        for seed in range(5)
    ]
    got = drive(engine(model), [*free[:2], *constrained, *free[2:]])
    for r in free:
        assert got[r.request_id] == alone[r.request_id], r.request_id
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    distinct = set()
    for r in constrained:
        ids, finish = got[r.request_id]
        text = text_of(tok, ids)
        assert finish == "stop", f"{r.request_id} ended by {finish}: {text!r}"
        schema = SCHEMAS[int(r.request_id[1:].split("-")[0])]
        jsonschema.Draft202012Validator(schema, format_checker=checker).validate(json.loads(text))
        distinct.add(text)
    assert len(distinct) > len(SCHEMAS)  # the seeds really sampled different outputs


KINDS = {
    "regex": (GrammarSpec("regex", r"[a-c]{2,4}-[0-9]+"), r"[a-c]{2,4}-[0-9]+"),
    "choice": (GrammarSpec.choice(["alpha", "beta", "gamma delta"]), r"alpha|beta|gamma delta"),
    "lark": (
        GrammarSpec("lark", 'start: "(" N ("," N)* ")"\nN: /[0-9]{1,2}/'),
        r"\(\d\d?(,\d\d?)*\)",
    ),
    "gbnf": (GrammarSpec("gbnf", 'root ::= "x" [0-9] [0-9]? "!"'), r"x\d\d?!"),
    "json_object": (GrammarSpec("json_object"), None),
}


@pytest.mark.parametrize("kind", KINDS)
def test_other_grammar_kinds(world, kind):
    model, tok, compiler = world
    spec, pattern = KINDS[kind]
    reqs = [
        EngineRequest(
            f"g{seed}",
            prompt_for(seed),
            sampled(seed, 300),
            eos_token_ids=frozenset({EOS}),
            constraint=compiler.constraint(spec),
        )
        for seed in range(5)
    ]
    for rid, (ids, finish) in drive(engine(model), reqs).items():
        text = text_of(tok, ids)
        if pattern is None and finish == "length":
            # A free-form object from a random model may not close in time; what it wrote is
            # a prefix the grammar accepts.
            fresh = compiler.constraint(spec)
            for t in ids:
                fresh.advance(t)
            continue
        assert finish == "stop", f"{rid}: {text!r} ({finish})"
        if pattern is None:
            assert isinstance(json.loads(text), dict)
        else:
            assert re.fullmatch(pattern, text), f"{rid}: {text!r}"


def test_length_cut_output_is_a_prefix_and_says_length(world):
    model, tok, compiler = world
    spec = GrammarSpec.json_schema({"type": "array", "items": {"type": "integer"}, "minItems": 50})
    req = EngineRequest(
        "cut", prompt_for(3), sampled(1, 12), frozenset({EOS}), constraint=compiler.constraint(spec)
    )
    ids, finish = drive(engine(model), [req])["cut"]
    assert finish == "length" and len(ids) == 12
    assert text_of(tok, ids).startswith("[")


def test_grammars_are_compiled_once_per_content(world):
    _, _, compiler = world
    spec = GrammarSpec.json_schema({"type": "object", "properties": {"q": {"type": "boolean"}}})
    a, b = compiler.constraint(spec), compiler.constraint(spec)
    assert a.matcher is not b.matcher  # each request gets its own state
    assert list(compiler._cache).count(spec) == 1
    a.advance(int(np.flatnonzero(a.allowed(96))[0]))
    assert a.allowed(96).tolist() != b.allowed(96).tolist()  # b is untouched by a


MISSING_REF = {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}
BAD = {
    "schema-ref": (GrammarSpec.json_schema(MISSING_REF), "missing"),
    "schema-unsupported": (
        GrammarSpec.json_schema({"properties": {"a": {"propertyNames": {}}}}),
        "propertyNames.*at /properties/a/propertyNames",
    ),
    "schema-ref-path": (GrammarSpec.json_schema(MISSING_REF), "at /properties/a/\\$ref"),
    "regex": (GrammarSpec("regex", "[a-"), "regex"),
    "lark": (GrammarSpec("lark", "start: nothing_defined"), "nothing_defined"),
    "choice": (GrammarSpec.choice([]), "choice"),
    "kind": (GrammarSpec("sound", "x"), "sound"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_grammars_are_errors_naming_the_problem(world, case):
    _, _, compiler = world
    spec, words = BAD[case]
    with pytest.raises(GrammarError, match=words):
        compiler.constraint(spec)
