"""Property-based fuzzing of every operation in ``/openapi.json`` (schemathesis generates the
requests from the server's own schema, valid and invalid ones) against a real uvicorn server on
loopback serving a tiny model.

For every generated request: no 5xx, and every 4xx answers in the route's error shape (OpenAI's
``{"error": {"message", "type", "param", "code"}}``, Anthropic's
``{"type": "error", "error": {"type", "message"}}`` under ``/v1/messages``). After each operation's
examples the server still answers ``/health`` and its engine goes back to idle (no request running,
no KV block in use).

Bounds, so the whole file fits a CI run: ``2 * EXAMPLES`` requests per operation (valid and
invalid ones), no shrinking, a fixed seed (derandomized). About half the generated bodies that
name a model name the served one (the rest keep whatever was generated), so requests get past
"no such model" into generation. Generated token budgets (``max_tokens``,
``max_completion_tokens``, ``max_output_tokens``) are capped at ``MAX_TOKENS`` and ``n`` at
``MAX_N`` where they are integers, so a request generates a few tokens at most; values the schema
rejects (e.g. ``max_tokens: 0``) are left alone and must still come back as a 4xx.
"""

from __future__ import annotations

import time

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis (the dev extra) is needed")

import httpx  # noqa: E402
import requests  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from server.app import create_app  # noqa: E402
from server.errors import is_anthropic  # noqa: E402
from server.settings import ServerSettings  # noqa: E402
from tests.server.fixtures import serving_tiny, write_tiny_model  # noqa: E402

MODEL = "tiny"
EXAMPLES = 12
MAX_TOKENS = 3
MAX_N = 2
TOKEN_BUDGETS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
REQUEST_TIMEOUT = 30  # seconds; a request that takes longer is a hang


def _operations() -> list[str]:
    """Every operation of the app's schema, as "METHOD /path" (read without serving anything)."""
    spec = create_app(ServerSettings(model="unused")).openapi()
    return [f"{m.upper()} {p}" for p, ops in spec["paths"].items() for m in ops]


OPERATIONS = _operations()

# Operations with a bug the fuzzer found and that is not fixed yet (none at the moment):
# "METHOD /path": "the bug, precisely".
KNOWN_FAILURES: dict[str, str] = {}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = write_tiny_model(tmp_path_factory.mktemp("fuzz"))
    adapters = folder / "adapters"  # so /v1/load_lora_adapter gets past "loading is off"
    adapters.mkdir()
    with serving_tiny(folder, name=MODEL, adapter_dir=adapters) as (url, _state):
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        yield url, schema


def _steer(case, served_model: bool) -> None:
    """Cap the token budgets and ``n`` (see the module's docstring); with ``served_model``, name
    the served model, so the request reaches generation instead of stopping at "no such model"."""
    body = case.body
    if not isinstance(body, dict):
        return
    if served_model and "model" in body:
        body["model"] = MODEL
    for key in TOKEN_BUDGETS:
        if _is_int(body.get(key)) and body[key] > MAX_TOKENS:
            body[key] = MAX_TOKENS
    if _is_int(body.get("n")) and body["n"] > MAX_N:
        body["n"] = MAX_N


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# The error types a client error may carry (a 4xx is never a server's "api_error"/"server_error").
OPENAI_4XX_TYPES = {
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "rate_limit_error",
}
ANTHROPIC_4XX_TYPES = OPENAI_4XX_TYPES | {"request_too_large"}


def _check_error_shape(path: str, body) -> None:
    if is_anthropic(path):
        assert isinstance(body, dict) and set(body) == {"type", "error"}, body
        assert body["type"] == "error", body
        err = body["error"]
        assert isinstance(err, dict) and set(err) == {"type", "message"}, body
        assert err["type"] in ANTHROPIC_4XX_TYPES, body
    else:
        assert isinstance(body, dict) and set(body) == {"error"}, body
        err = body["error"]
        assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, body
        assert err["type"] in OPENAI_4XX_TYPES, body
    assert isinstance(err["message"], str) and err["message"], body


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def _assert_serving_and_idle(url: str, deadline_s: float = 30.0) -> None:
    assert httpx.get(f"{url}/health", timeout=REQUEST_TIMEOUT).status_code == 200
    deadline = time.monotonic() + deadline_s
    while True:
        text = httpx.get(f"{url}/metrics", timeout=REQUEST_TIMEOUT).text
        running = _metric(text, "candlewick_num_requests_running")
        usage = _metric(text, "candlewick_kv_cache_usage_ratio")
        assert running is not None and usage is not None, text
        if running == 0 and usage == 0:
            return
        assert time.monotonic() < deadline, f"not idle: {running} running, KV usage {usage}"
        time.sleep(0.05)


@pytest.mark.parametrize(
    "label",
    [
        pytest.param(op, marks=pytest.mark.xfail(reason=KNOWN_FAILURES[op], strict=True))
        if op in KNOWN_FAILURES
        else op
        for op in OPERATIONS
    ],
)
def test_fuzz_operation(served, label):
    url, schema = served
    method, path = label.split(" ", 1)
    operation = schema[path][method]
    strategy = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )
    session = requests.Session()

    @settings(
        max_examples=2 * EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy, served_model=st.booleans())
    def fuzz(case, served_model):
        _steer(case, served_model)
        response = case.call(base_url=url, session=session, timeout=REQUEST_TIMEOUT)
        where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text}"
        assert response.status_code < 500, where
        if 400 <= response.status_code < 500:
            try:
                body = response.json()
            except ValueError:
                pytest.fail(f"4xx body is not JSON: {where}")
            _check_error_shape(path, body)

    fuzz()
    _assert_serving_and_idle(url)


_LONE = b'{"model": "tiny", @: [{"role": "user", "content": "\\ud800"}]}'

# Requests found answered wrongly, replayed on every run: (method, path, how the body is sent,
# the body, the status it must get). The fuzzer's strings never hold lone surrogates (they could
# not be encoded to send), so those bodies are written out as JSON bytes.
FOUND = [
    # A 500: an empty messages list passed validation and failed rebuilding the chat request.
    ("POST", "/tokenize", "json", {"messages": []}, 400),
    # A body the framework cannot parse answered with the error type "error" (Anthropic's
    # "api_error"), a server's type for a client's mistake.
    # (Bytes that are not UTF-8 under a JSON content type; a multipart body that is not.)
    ("POST", "/v1/completions", "json-bytes", b"\xff{", 400),
    ("POST", "/v1/messages", "json-bytes", b"\xff{", 400),
    ("POST", "/v1/adapters", "multipart-bytes", b"nonsense", 400),
    # 500s: a string holding a lone surrogate escape ("\ud800") reached the tokenizer.
    ("POST", "/v1/chat/completions", "json-bytes", _LONE.replace(b"@", b'"messages"'), 400),
    ("POST", "/v1/completions", "json-bytes", b'{"model": "tiny", "prompt": "\\ud800"}', 400),
    (
        "POST",
        "/v1/messages",
        "json-bytes",
        _LONE.replace(b"@", b'"max_tokens": 2, "messages"'),
        400,
    ),
    ("POST", "/v1/messages/count_tokens", "json-bytes", _LONE.replace(b"@", b'"messages"'), 400),
    ("POST", "/v1/responses", "json-bytes", b'{"model": "tiny", "input": "\\ud800"}', 400),
    ("POST", "/tokenize", "json-bytes", b'{"prompt": "a\\udfff"}', 400),
    # 500s: a lora_path the file system refuses (a NUL byte; a name over its length limit).
    ("POST", "/v1/load_lora_adapter", "json", {"lora_name": "a", "lora_path": "a\u0000b"}, 400),
    ("POST", "/v1/load_lora_adapter", "json", {"lora_name": "a", "lora_path": "a" * 300}, 400),
]


@pytest.mark.parametrize("method,path,how,body,status", FOUND)
def test_found_cases(served, method, path, how, body, status):
    url, _ = served
    if how == "json":
        kwargs = {"json": body}
    elif how == "json-bytes":
        kwargs = {"content": body, "headers": {"content-type": "application/json"}}
    else:
        kwargs = {"content": body, "headers": {"content-type": "multipart/form-data; boundary=x"}}
    r = httpx.request(method, f"{url}{path}", timeout=REQUEST_TIMEOUT, **kwargs)
    assert r.status_code == status, r.text
    _check_error_shape(path, r.json())


def test_schema_covers_every_route(served):
    """The fuzzed operations are the served schema's: none is left out."""
    url, _ = served
    spec = httpx.get(f"{url}/openapi.json").json()
    assert sorted(f"{m.upper()} {p}" for p, ops in spec["paths"].items() for m in ops) == sorted(
        OPERATIONS
    )
    _assert_serving_and_idle(url)


def test_anthropic_tool_errors_name_its_fields(served):
    """/v1/messages checks its tools as OpenAI function tools; its errors still name the fields
    as the request has them (``input_schema``, ``tool_choice.name``)."""
    url, _ = served
    base = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    tools = [{"name": "f", "input_schema": {"type": "banana"}}]
    r = httpx.post(f"{url}/v1/messages", json={**base, "tools": tools}, timeout=REQUEST_TIMEOUT)
    assert r.status_code == 400, r.text
    _check_error_shape("/v1/messages", r.json())
    assert r.json()["error"]["message"].startswith("tools[0].input_schema: "), r.text
    choice = {"type": "tool", "name": "nope"}
    r = httpx.post(f"{url}/v1/messages", json={**base, "tool_choice": choice}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith("tool_choice.name: "), r.text
