"""GGUF K-quants (Q2_K..Q6_K) and Q5_0/Q5_1: loaded exactly and kept quantized.

Oracles: gguf-py's `gguf.quants.dequantize` (llama.cpp's dequantization) for every weight; the
exact float64 forward in each `.ref.json` of shared/models/kquants (files made by llama.cpp's
own quantizer) for greedy tokens and logits; transformers for models of our own whose rows hold
several super-blocks, which the shared files (one super-block per row) do not exercise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from mlx.utils import tree_flatten

from engine.loader import gguf_tensors
from engine.loader.gguf import load_gguf, load_gguf_model
from engine.loader.gguf_blocks import pack_codes
from engine.loader.gguf_reader import GGUFFile, GGUFFormatError
from engine.loader.gguf_tensors import (
    AffineQuantized,
    SubBlockQuantized,
    UnsupportedTensorType,
    dense,
    tensor_to_mlx,
)
from engine.models import quantized
from engine.models.quantized import (
    FORMATS,
    SubBlockEmbedding,
    SubBlockLinear,
    dequantize_sub_blocks,
    sub_block_affine,
    unpack_codes,
)
from tests.engine.kquant_blocks import K_TYPES, random_blocks
from tests.engine.test_gguf_tensors import awkward_matrix
from tests.engine.test_gguf_tensors import write_gguf as write_tensors

ROOT = Path(__file__).resolve().parents[2]
KQUANTS = ROOT.parent / "shared" / "models" / "kquants"  # the shared test data beside the repo
FILES = ["F32", "Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "Q5_0", "Q5_1", "Q8_0"]
NORMS = [f"model.layers.{i}.{n}_layernorm" for i in (0, 1) for n in ("input", "post_attention")]
NORMS.append("model.norm")
AFFINE = {T.Q5_0: 5, T.Q5_1: 5, T.Q4_K: 4, T.Q5_K: 5}


def fixture(name: str) -> Path:
    path = KQUANTS / f"kq-tiny-llama.{name}.gguf"
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared K-quant fixtures are not beside the repo)")
    return path


@pytest.mark.parametrize("name", FILES)
def test_every_fixture_weight_equals_gguf_dequantize(name):
    reader = GGUFFile(fixture(name))
    for t in reader.tensors:
        ours = tensor_to_mlx(t, mx.float32)
        if t.tensor_type in AFFINE:
            assert isinstance(ours, AffineQuantized), t.name
            assert (ours.bits, ours.group_size) == (AFFINE[t.tensor_type], 32)
            assert ours.scales.dtype == ours.biases.dtype == mx.float32
        if t.tensor_type.name in FORMATS:
            assert isinstance(ours, SubBlockQuantized), t.name
        ref = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        got = np.array(dense(ours))
        assert got.dtype == np.float32 and np.array_equal(got, ref.reshape(got.shape)), t.name


@pytest.mark.parametrize("name", FILES)
def test_greedy_tokens_and_logits_equal_the_exact_oracle(name):
    from tests.engine.test_models_vs_transformers import our_greedy

    path = fixture(name)
    refs = json.loads(Path(f"{path}.ref.json").read_text())
    model, _ = load_gguf_model(path, mx.float32)
    for prompt_name, ref in refs["prompts"].items():
        oracle = ref["oracle"]
        tokens, logits = our_greedy(model, ref["prompt_ids"], len(oracle["ids"]))
        assert tokens == oracle["ids"], prompt_name
        np.testing.assert_allclose(logits[0][-1], oracle["prompt_logits"], rtol=0, atol=1e-3)
        np.testing.assert_allclose(logits[-1][-1], oracle["last_logits"], rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", ["Q4_K_M", "Q3_K_M", "Q2_K"])
def test_batched_paged_engine_gives_the_oracle_tokens(name):
    """The serving path: the three prompts decode together through the paged KV cache."""
    from engine.config import EngineConfig
    from engine.engine_core import EngineCore
    from engine.request import EngineRequest
    from engine.sampling_params import SamplingParams

    path = fixture(name)
    refs = json.loads(Path(f"{path}.ref.json").read_text())["prompts"]
    model, _ = load_gguf_model(path, mx.float32)
    core = EngineCore(model, EngineConfig(num_blocks=64, block_size=16), mx.float32)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    for key, ref in refs.items():
        core.add_request(EngineRequest(key, ref["prompt_ids"], params))
    tokens: dict[str, list[int]] = {key: [] for key in refs}
    while core.has_work:
        for out in core.step():
            assert out.error is None, out.error
            tokens[out.request_id].extend(out.new_token_ids)
    assert tokens == {key: ref["oracle"]["ids"] for key, ref in refs.items()}


@pytest.mark.parametrize(
    ("name", "dtype"), [("Q4_K_M", mx.float32), ("Q6_K", mx.float32), ("Q8_0", mx.float16)]
)
def test_k_quant_files_compute_in_float32(name, dtype):
    """Float32 K-quant scales promote every activation: the model says so, for its KV cache."""
    loaded = load_gguf(fixture(name), mx.float16)
    assert loaded.dtype == dtype
    hidden = loaded.model.hidden(mx.array([[1, 403]]), loaded.model.make_cache())
    assert hidden.dtype == dtype


def test_q4_k_m_stays_quantized_within_1_3x_the_file():
    """No dense copy of the model: the parameters' bytes stay within 1.3x the file's."""
    path = fixture("Q4_K_M")
    model, _ = load_gguf_model(path, mx.float32)
    params = dict(tree_flatten(model.parameters()))
    total = sum(v.nbytes for v in params.values())
    assert total <= 1.3 * path.stat().st_size, (total, path.stat().st_size)
    dense = [k for k, v in params.items() if k.endswith(".weight") and v.dtype != mx.uint32]
    assert dense == [f"{n}.weight" for n in NORMS], dense  # every matrix is packed codes
    head = model.lm_head  # Q6_K in every K recipe
    assert isinstance(head, SubBlockLinear) and head.weight.dtype == mx.uint32


# Rows of several super-blocks (the shared files have one per row).


@pytest.mark.parametrize("kind", K_TYPES, ids=lambda k: k.name)
@pytest.mark.parametrize("shape", [(1, 256), (5, 1536), (3, 768)])
def test_multi_super_block_rows_equal_gguf_dequantize(kind, shape, tmp_path, monkeypatch):
    raw = random_blocks(kind, *shape, np.random.default_rng(shape[1]))
    monkeypatch.setattr(gguf_tensors, "CHUNK_BYTES", 2 * raw.shape[1])  # rows converted 2 by 2
    reader = write_tensors(tmp_path / "k.gguf", {"w": (raw, kind)})
    ours = np.array(dense(tensor_to_mlx(reader.tensors[0], mx.float32)))
    ref = gguf.quants.dequantize(raw, kind)
    assert ours.shape == shape and np.array_equal(ours, ref)


@pytest.mark.parametrize("kind", [T.Q5_0, T.Q5_1], ids=lambda k: k.name)
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=str)
def test_q5_blocks_equal_gguf_dequantize(kind, dtype, tmp_path):
    weights = awkward_matrix(7, 1536, seed=3)
    raw = gguf.quants.quantize(weights, kind)
    reader = write_tensors(tmp_path / "q5.gguf", {"w": (raw, kind)})
    ours = tensor_to_mlx(reader.tensors[0], dtype)
    assert ours.scales.dtype == dtype  # an f16 d (and m) is exact in float16
    ref = gguf.quants.dequantize(raw, kind)
    assert np.array_equal(
        np.array(ours.dequantize().astype(mx.float32)), ref.astype(dtype_np(dtype))
    )


def dtype_np(dtype: mx.Dtype):
    return np.float32 if dtype == mx.float32 else np.float16


def test_k_quant_scales_stay_float32_whatever_dtype_is_asked(tmp_path):
    raw = random_blocks(T.Q4_K, 4, 512, np.random.default_rng(0))
    reader = write_tensors(tmp_path / "k.gguf", {"w": (raw, T.Q4_K)})
    ours = tensor_to_mlx(reader.tensors[0], mx.bfloat16)
    assert ours.scales.dtype == ours.biases.dtype == mx.float32
    assert np.array_equal(np.array(ours.dequantize()), gguf.quants.dequantize(raw, T.Q4_K))


def test_plain_unpacking_matches_numpy_and_mlx_dequantize():
    rng = np.random.default_rng(1)
    for bits in (2, 3, 4, 5, 6, 8):
        codes = rng.integers(0, 2**bits, size=(3, 128), dtype=np.uint8)
        packed = mx.array(pack_codes(codes, bits))
        assert np.array_equal(np.array(unpack_codes(packed, bits)), codes), bits
    for fmt in FORMATS.values():  # MLX's own dequantize takes group 16 on the CPU: a 2nd opinion
        weight = mx.array(rng.integers(0, 2**32, size=(5, 32 * fmt.bits), dtype=np.uint32))
        scales = mx.array(rng.integers(0, 256, size=(5, 64), dtype=np.uint8))
        scales = scales if fmt.has_min else mx.view(scales, mx.int8)
        d = mx.array(rng.standard_normal((5, 4)).astype(np.float16))
        dmin = mx.array(rng.standard_normal((5, 4)).astype(np.float16))
        scale, bias = sub_block_affine(fmt, scales, d, dmin)
        native = mx.dequantize(weight, scale, bias, group_size=16, bits=fmt.bits)
        assert np.array_equal(np.array(dequantize_sub_blocks(fmt, weight, scales, d, dmin)), native)


@pytest.mark.parametrize("kind", [T.Q6_K, T.Q3_K, T.Q2_K], ids=lambda k: k.name)
def test_sub_block_layers_compute_with_the_exact_weights(kind, tmp_path, monkeypatch):
    raw = random_blocks(kind, 40, 768, np.random.default_rng(5))
    reader = write_tensors(tmp_path / "k.gguf", {"w": (raw, kind)})
    value = tensor_to_mlx(reader.tensors[0], mx.float32)
    w = gguf.quants.dequantize(raw, kind)  # [40, 768]
    linear = SubBlockLinear(768, 40, FORMATS[kind.name])
    linear.update(value.arrays())
    x = np.random.default_rng(6).standard_normal((2, 3, 768)).astype(np.float32)
    expected = x.astype(np.float64) @ w.T.astype(np.float64)
    whole = np.array(linear(mx.array(x)))
    np.testing.assert_allclose(whole, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    monkeypatch.setattr(quantized, "CHUNK_ELEMENTS", 768 * 7)  # 6 chunks of 7 rows, one of 5
    np.testing.assert_allclose(np.array(linear(mx.array(x))), whole, rtol=1e-6, atol=1e-6)
    table = SubBlockEmbedding(40, 768, FORMATS[kind.name])
    table.update(value.arrays())
    ids = np.array([[3, 0, 39], [7, 7, 1]])
    assert np.array_equal(np.array(table(mx.array(ids))), w[ids])
    np.testing.assert_allclose(np.array(table.as_linear(mx.array(x))), whole, rtol=1e-6, atol=1e-6)


# A whole model whose rows hold several super-blocks, against transformers.

MIX = {  # every supported quantized type, on tensors of 1 to 3 super-blocks per row
    "attn_q": T.Q4_K,
    "attn_k": T.Q5_K,
    "attn_v": T.Q6_K,
    "attn_output": T.Q3_K,
    "ffn_gate": T.Q2_K,
    "ffn_up": T.Q5_0,
    "ffn_down": T.Q6_K,
    "output": T.Q5_1,
}


@pytest.mark.parametrize(
    ("tiny", "arch", "embedding"),
    [("llama", "llama", T.Q4_K), ("qwen2", "qwen2", T.Q6_K)],  # qwen2: tied, Q6_K as the head
)
def test_model_of_mixed_k_quants_matches_transformers(tiny, arch, embedding, tmp_path):
    pytest.importorskip("torch")
    import torch

    from tests.engine.gguf_writer import write_gguf
    from tests.engine.test_models_vs_transformers import assert_close, our_greedy
    from tests.engine.tiny_models import VOCAB, build_tiny, reference_greedy

    hf_model = build_tiny(tiny, tmp_path / "hf", hidden_size=512, intermediate_size=768)
    rng = np.random.default_rng(7)

    def encode(name: str, w: np.ndarray) -> tuple[np.ndarray, T]:
        kind = embedding if name.startswith("token_embd") else MIX[name.split(".")[-2]]
        if kind in K_TYPES:
            return random_blocks(kind, *w.shape, rng), kind
        return gguf.quants.quantize(w, kind), kind

    effective = write_gguf(hf_model, arch, tmp_path / "m.gguf", T.F32, encode=encode)
    with torch.no_grad():
        state = {k: torch.from_numpy(v) for k, v in effective.items()}
        hf_model.load_state_dict(state, strict=False)
    prompt = np.random.default_rng(2).integers(3, VOCAB, size=9).tolist()
    ref_tokens, ref_logits = reference_greedy(hf_model, prompt, 12)

    model, _ = load_gguf_model(tmp_path / "m.gguf", mx.float32)
    assert isinstance(model.model.layers[0].mlp.down_proj, SubBlockLinear)
    tokens, logits = our_greedy(model, prompt, 12)
    for ours, ref in zip(logits, ref_logits, strict=True):
        assert_close(ours, ref)
    assert tokens == ref_tokens


# Files candlewick refuses, with a message naming the file, the tensor and the problem.


def with_tensor_type(src: Path, dst: Path, tensors: dict[str, T]) -> Path:
    """A copy of `src` whose tensor infos claim other ggml types (same or fewer data bytes)."""
    data = bytearray(src.read_bytes())
    dims = {t.name: len(t.shape) for t in GGUFFile(src).tensors}
    for name, kind in tensors.items():
        key = len(name).to_bytes(8, "little") + name.encode()
        at = data.index(key) + len(key) + 4 + 8 * dims[name]  # past n_dims and the dims
        data[at : at + 4] = int(kind).to_bytes(4, "little")
    dst.write_bytes(bytes(data))
    return dst


def test_iq_and_ternary_types_are_refused_naming_every_tensor(tmp_path):
    bad = {
        "blk.0.ffn_up.weight": T.IQ4_XS,
        "blk.1.ffn_up.weight": T.TQ2_0,
        "blk.0.ffn_gate.weight": T.IQ2_XXS,
    }
    path = with_tensor_type(fixture("Q4_K_S"), tmp_path / "iq.gguf", bad)
    with pytest.raises(UnsupportedTensorType) as caught:
        load_gguf_model(path, mx.float32)
    message = str(caught.value)
    assert message.startswith("iq.gguf: tensor 'blk.0.ffn_gate.weight' has type IQ2_XXS")
    assert (
        "'blk.0.ffn_up.weight' (IQ4_XS)" in message and "'blk.1.ffn_up.weight' (TQ2_0)" in message
    )


def test_serving_an_unsupported_file_exits_1_before_serving(tmp_path):
    from tests.server.test_admission import free_port

    path = with_tensor_type(fixture("Q4_K_M"), tmp_path / "iq1.gguf", {"output.weight": T.IQ1_S})
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(path),
         "--port", str(free_port()), "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert "tensor 'output.weight' has type IQ1_S" in out.stderr and "Traceback" not in out.stderr


def test_truncated_data_names_the_file_and_the_tensor(tmp_path):
    src = fixture("Q4_K_M")
    path = tmp_path / "cut.gguf"
    shutil.copyfile(src, path)
    with path.open("r+b") as f:
        f.truncate(src.stat().st_size - 1000)
    with pytest.raises(GGUFFormatError) as caught:
        load_gguf_model(path, mx.float32)
    last = max(GGUFFile(src).tensors, key=lambda t: t.data_offset)
    assert str(path) in str(caught.value) and "truncated" in str(caught.value)
    assert repr(last.name) in str(caught.value)


@pytest.mark.parametrize("name", ["Q4_K_M", "Q2_K"])
def test_completions_over_http_return_the_oracle_text(name, tmp_path):
    import httpx

    from server.settings import ServerSettings
    from server.state import ServerState
    from tests.server.fixtures import running_server

    path = fixture(name)
    refs = json.loads(Path(f"{path}.ref.json").read_text())["prompts"]
    settings = ServerSettings(model=str(path), data_dir=tmp_path / "data", num_blocks=64)
    state = ServerState(settings)
    state.start()
    with running_server(settings, state) as url:
        for key, ref in refs.items():
            body = {"model": path.stem, "prompt": ref["prompt_ids"], "max_tokens": 24,
                    "temperature": 0}  # fmt: skip
            reply = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
            assert reply.status_code == 200, reply.text
            text = reply.json()["choices"][0]["text"]
            assert text.strip() == ref["oracle"]["text"].strip(), key
