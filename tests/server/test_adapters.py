"""LoRA adapters over HTTP: upload, per-request selection, mixed batches, hot swap, delete,
restart, bad uploads, vLLM's aliases. PEFT on the same base model is the reference."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from server.settings import ServerSettings
from server.state import ServerState
from tests.engine.tiny_models import build_tiny, reference_greedy
from tests.server.fixtures import running_server, write_tiny_model

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

PROMPT = "adapt me"
STEPS = 8
TARGETS = {
    "qv": ["q_proj", "v_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def make_peft(base: Path, out: Path, seed: int, targets: list[str], r: int = 4) -> Path:
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
    pm = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.5 * torch.randn_like(p))
    pm.save_pretrained(out)
    return out


def peft_text(base: Path, adapter: Path | None) -> str:
    import transformers

    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter)
    model.eval()
    tokens = reference_greedy(model, tok.encode(PROMPT), STEPS)[0]
    return tok.decode(tokens, skip_special_tokens=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = write_tiny_model(root / "base")
    adapters = {n: make_peft(base, root / "adapters" / n, i, t) for i, (n, t) in
                enumerate(TARGETS.items())}  # fmt: skip
    adapters["qv2"] = make_peft(base, root / "adapters" / "qv2", 99, TARGETS["qv"])
    expected = {n: peft_text(base, p) for n, p in adapters.items()}
    expected["base"] = peft_text(base, None)
    assert len(set(expected.values())) == len(expected), "adapters must change the output"
    return root, base, adapters, expected


def settings_for(root: Path, base: Path, **kw) -> ServerSettings:
    return ServerSettings(model=str(base), served_model_name="base", num_blocks=256,
                          data_dir=root / "data", max_loras=2, max_lora_rank=8,
                          adapter_dir=root / "adapters", **kw)  # fmt: skip


@pytest.fixture
def server(world):
    root, base, _, _ = world
    settings = settings_for(root, base)
    state = ServerState(settings)
    state.start()
    with running_server(settings, state) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c, state


def upload(c: httpx.Client, name: str, folder: Path) -> httpx.Response:
    files = {
        "config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
        "weights": (
            "adapter_model.safetensors",
            (folder / "adapter_model.safetensors").read_bytes(),
        ),
    }
    return c.post("/v1/adapters", data={"name": name}, files=files)


def body_for(model: str, max_tokens: int = STEPS) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}  # fmt: skip


def complete(c: httpx.Client, model: str, max_tokens: int = STEPS) -> httpx.Response:
    return c.post("/v1/completions", json=body_for(model, max_tokens))


def text_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def clear(c: httpx.Client) -> None:
    for a in c.get("/v1/adapters").json()["data"]:
        c.delete(f"/v1/adapters/{a['id']}")


def test_upload_describe_and_generate_like_peft(server, world):
    c, _ = server
    _, _, adapters, expected = world
    clear(c)
    r = upload(c, "qv", adapters["qv"])
    assert r.status_code == 201, r.text
    body = r.json()
    import hashlib

    digest = hashlib.sha256((adapters["qv"] / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert body["id"] == "qv" and body["object"] == "adapter" and body["version"] == 1
    assert body["digest"] == f"sha256:{digest}" and body["parent"] == "base"
    assert body["rank"] == 4
    assert body["target_modules"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert c.get("/v1/adapters/qv").json() == body
    models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert models["qv"]["parent"] == "base" and models["base"]["parent"] is None
    assert text_of(complete(c, "qv")) == expected["qv"]
    assert text_of(complete(c, "base")) == expected["base"]


def test_mixed_adapters_share_a_batch_and_each_equals_its_reference(server, world):
    c, state = server
    _, _, adapters, expected = world
    clear(c)
    for name in ("qv", "mlp", "all"):
        assert upload(c, name, adapters[name]).status_code == 201
    names = ["base", "qv", "mlp", "all"] * 3  # more adapters than the 2 device slots

    async def main():
        async with httpx.AsyncClient(base_url=str(c.base_url), timeout=60) as ac:
            return await asyncio.gather(
                *(ac.post("/v1/completions", json=body_for(m)) for m in names)
            )

    results = asyncio.run(main())
    for name, r in zip(names, results, strict=True):
        assert text_of(r) == expected[name], name
    metrics = c.get("/metrics").text
    assert 'candlewick_generation_tokens_total{model="mlp"}' in metrics
    assert state.engine.stats.adapters_loaded <= 2


def test_hot_swap_and_delete_while_streaming(server, world):
    c, _ = server
    _, _, adapters, expected = world
    clear(c)
    assert upload(c, "swap", adapters["qv"]).json()["version"] == 1
    long_body = {
        "model": "swap",
        "prompt": PROMPT,
        "max_tokens": STEPS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with c.stream("POST", "/v1/completions", json=long_body) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        r = upload(c, "swap", adapters["qv2"])
        assert r.status_code == 201 and r.json()["version"] == 2
        assert text_of(complete(c, "swap")) == expected["qv2"]  # after the answer: v2
        rest = [first, *(line for line in lines if line.startswith("data:"))]
    chunks = [json.loads(line[5:]) for line in rest if line != "data: [DONE]"]
    assert all("error" not in ch for ch in chunks)
    assert "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"]) == expected["qv"]

    with c.stream("POST", "/v1/completions", json=long_body) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert c.delete("/v1/adapters/swap").json() == {
            "id": "swap",
            "object": "adapter",
            "deleted": True,
        }
        assert complete(c, "swap").status_code == 404
        rest = [first, *(line for line in lines if line.startswith("data:"))]
    chunks = [json.loads(line[5:]) for line in rest if line != "data: [DONE]"]
    assert "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"]) == expected["qv2"]
    assert c.delete("/v1/adapters/swap").status_code == 404


def test_adapters_survive_a_restart(world):
    root, base, adapters, expected = world
    settings = settings_for(root, base)
    state = ServerState(settings)
    state.start()
    with running_server(settings, state) as url, httpx.Client(base_url=url, timeout=60) as c:
        clear(c)
        assert upload(c, "keep", adapters["mlp"]).status_code == 201
    again = ServerState(settings)
    again.start()
    with running_server(settings, again) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert [a["id"] for a in c.get("/v1/adapters").json()["data"]] == ["keep"]
        assert text_of(complete(c, "keep")) == expected["mlp"]


def test_bad_uploads_name_every_problem_and_change_nothing(server, world, tmp_path):
    c, _ = server
    _, _, adapters, _ = world
    clear(c)
    assert upload(c, "good", adapters["qv"]).status_code == 201
    before = c.get("/v1/adapters").json()
    good_config = (adapters["qv"] / "adapter_config.json").read_bytes()
    good_weights = (adapters["qv"] / "adapter_model.safetensors").read_bytes()

    def post(name, config, weights):
        files = {"config": ("c.json", config), "weights": ("w.safetensors", weights)}
        return c.post("/v1/adapters", data={"name": name}, files=files)

    r = post("../evil", good_config, b"not safetensors at all")
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "safetensors" in message and ".." in message
    cfg = json.loads(good_config)
    r = post("x", json.dumps({**cfg, "target_modules": ["q_proj", "lm_head"]}).encode(),
             good_weights)  # fmt: skip
    assert r.status_code == 400 and "lm_head" in r.json()["error"]["message"]
    r = post("x", json.dumps({**cfg, "r": 64}).encode(), good_weights)  # over --max-lora-rank 8
    assert r.status_code == 400 and "64" in r.json()["error"]["message"]
    r = post("a/b", good_config, good_weights)
    assert r.status_code == 400 and "/" in r.json()["error"]["message"]
    r = post("base", good_config, good_weights)  # the base model's own name
    assert r.status_code == 400
    # An adapter trained for other shapes (a narrower model): every mismatch is named.
    narrow = tmp_path / "narrow"
    build_tiny("llama", narrow, hidden_size=32, intermediate_size=64, vocab_size=260)
    lora = make_peft(narrow, tmp_path / "narrow-lora", 1, ["q_proj", "down_proj"])
    r = post("narrow", (lora / "adapter_config.json").read_bytes(),
             (lora / "adapter_model.safetensors").read_bytes())  # fmt: skip
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "q_proj" in message and "down_proj" in message
    assert c.get("/v1/adapters").json() == before


def test_oversized_upload_is_413(world):
    root, base, adapters, _ = world
    settings = settings_for(root, base, max_adapter_bytes=1000)
    state = ServerState(settings)
    state.start()
    with running_server(settings, state) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = upload(c, "big", adapters["all"])
        assert r.status_code == 413


def test_vllm_load_and_unload_aliases(server, world, tmp_path):
    c, _ = server
    _, _, _, expected = world
    clear(c)
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "viaPath", "lora_path": "mlp"})
    assert r.status_code == 200, r.text
    assert text_of(complete(c, "viaPath")) == expected["mlp"]
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": str(tmp_path)})
    assert r.status_code == 403
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": "../base"})
    assert r.status_code == 403
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "viaPath"}).status_code == 200
    assert complete(c, "viaPath").status_code == 404


def test_thousand_upload_swap_delete_cycles_leak_nothing(world):
    """The promise of zero leaks while adapters switch, measured: device memory, open files and
    files on disk are the same after 1000 register / swap / delete cycles with traffic."""
    import os

    import mlx.core as mx

    root, base, adapters, expected = world
    settings = settings_for(root, base)
    state = ServerState(settings)
    state.start()
    svc = state.adapters
    config = (adapters["qv"] / "adapter_config.json").read_bytes()
    variants = [(adapters[n] / "adapter_model.safetensors").read_bytes() for n in ("qv", "qv2")]

    def files() -> int:
        return sum(len(f) for _, _, f in os.walk(settings.data_dir))

    with running_server(settings, state) as url, httpx.Client(base_url=url, timeout=60) as c:
        clear(c)

        def cycle(i: int) -> None:
            name = f"churn{i % 3}"
            svc.register(name, config, variants[i % 2])
            if i % 50 == 0:
                assert text_of(complete(c, name)) == expected["qv" if i % 2 == 0 else "qv2"]
            if i % 3 == 2:
                svc.unregister(name)

        for i in range(30):  # warm up: every slot and cache path has been used
            cycle(i)
        memory, fds, on_disk = mx.get_active_memory(), len(os.listdir("/proc/self/fd")), files()
        for i in range(30, 1030):
            cycle(i)
        assert mx.get_active_memory() <= memory
        assert len(os.listdir("/proc/self/fd")) <= fds
        assert files() <= on_disk
