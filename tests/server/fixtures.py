"""A tiny served model (random weights, a byte-level tokenizer, a ChatML template) and a real
uvicorn server on a loopback port."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel

from server.app import create_app
from server.settings import ServerSettings
from server.state import ServerState
from tests.engine.tiny_models import build_tiny

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_model(folder: Path) -> Path:
    """A llama with a 259-token byte-level vocabulary: 256 bytes, then the ChatML specials."""
    build_tiny("llama", folder, vocab_size=260, eos_token_id=257, bos_token_id=256)
    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet(), key=_byte_of))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "bos_token": None, "chat_template": CHATML})
    )
    return folder


def _byte_of(ch: str) -> int:
    """GPT-2's byte-to-unicode table, inverted: which byte a ByteLevel character stands for."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + n)] = b
            n += 1
    return table[ch]


@contextmanager
def running_server(settings: ServerSettings, state: ServerState | None = None) -> Iterator[str]:
    """candlewick's app on a free loopback port in a thread; yields the base URL."""
    with serving(create_app(settings, state)) as url:
        yield url


@contextmanager
def serving(app) -> Iterator[str]:
    """Any ASGI app under uvicorn on a free loopback port in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        assert thread.is_alive(), "server thread died"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@contextmanager
def serving_tiny(folder: Path, name: str = "tiny", **settings) -> Iterator[tuple[str, ServerState]]:
    """The tiny model in ``folder`` served under ``name`` (started before the server, so the
    first request finds it loaded); yields the base URL and the state. The engine steps on a
    thread of this process (tests look inside it) unless ``engine_process=True``."""
    settings.setdefault("engine_process", False)
    config = ServerSettings(
        model=str(folder), data_dir=folder / "data", served_model_name=name, **settings
    )
    state = ServerState(config)
    state.start()
    with running_server(config, state) as url:
        yield url, state
