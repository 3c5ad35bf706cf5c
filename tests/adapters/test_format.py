"""parse_adapter against PEFT and mlx-lm themselves: what they wrote parses to the same tensors
and the same per-module delta; every bad upload is named; garbage never escapes as a crash."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest

from adapters.format import AdapterError, parse_adapter, validate_name
from adapters.safetensors_io import read_safetensors, write_safetensors
from engine.models.registry import config_from_hf
from tests.engine.tiny_models import build_tiny

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

LIMITS = dict(max_rank=16, max_bytes=1 << 24)
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
PREFIX = "base_model.model.model.layers"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> (transformers model, our ModelConfig) of a tiny random model."""
    out = {}
    for arch in ("llama", "qwen2"):
        folder = tmp_path_factory.mktemp(arch)
        model = build_tiny(arch, folder)
        out[arch] = (model, config_from_hf(json.loads((folder / "config.json").read_text())))
    return out


def peft_adapter(model, folder, **lora):
    """Apply a LoRA with random A and B to a copy of ``model``; save it as PEFT does."""
    torch.manual_seed(1)
    config = peft.LoraConfig(init_lora_weights=False, **lora)
    pm = peft.get_peft_model(copy.deepcopy(model), config)
    pm.save_pretrained(folder)
    files = (folder / "adapter_config.json", folder / "adapter_model.safetensors")
    return files[0].read_bytes(), files[1].read_bytes(), pm


def lora_modules(pm) -> dict[tuple[int, str], object]:
    """PEFT's own LoRA layers by (layer, module path)."""
    out = {}
    for name, module in pm.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            parts = name.split(".layers.")[1].split(".")
            out[(int(parts[0]), ".".join(parts[1:]))] = module
    return out


CASES = {
    "attention": ("llama", dict(r=4, lora_alpha=8, target_modules=ATTN)),
    "mlp-qwen2": ("qwen2", dict(r=2, lora_alpha=3, target_modules=MLP)),
    "all-rslora": ("llama", dict(r=4, lora_alpha=6, target_modules=ATTN + MLP, use_rslora=True)),
    "all-qwen2": ("qwen2", dict(r=3, lora_alpha=5, target_modules="all-linear")),
    "patterns": (
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=ATTN + MLP,
            rank_pattern={"layers.0.self_attn.q_proj": 8, "q_proj": 2, "mlp.down_proj": 6},
            alpha_pattern={"down_proj": 3, "k_proj": 1.5},
        ),
    ),
    "layers": (
        "qwen2",
        dict(
            r=2,
            lora_alpha=2,
            target_modules=["self_attn.v_proj", "up_proj"],
            layers_to_transform=[1],
        ),
    ),
    "regex": (
        "llama",
        dict(r=2, lora_alpha=4, target_modules=r".*\.layers\.1\.self_attn\.(q|v)_proj"),
    ),
    "exclude": ("llama", dict(r=2, lora_alpha=4, target_modules=ATTN, exclude_modules=["k_proj"])),
}


@pytest.mark.parametrize("case", CASES)
def test_peft_adapters_parse_to_peft_tensors_and_deltas(tiny, tmp_path, case):
    arch, lora = CASES[case]
    model, base = tiny[arch]
    config, weights, pm = peft_adapter(model, tmp_path, **lora)
    parsed = parse_adapter(config, weights, base, **LIMITS)
    expected = lora_modules(pm)
    assert parsed.format == "peft"
    assert set(parsed.modules) == set(expected)
    assert parsed.target_modules == tuple(sorted({m for _, m in expected}))
    assert parsed.rank == max(m.r["default"] for m in expected.values())
    x = np.random.default_rng(0).standard_normal((base.hidden_size * 2, 3)).astype(np.float32)
    for key, theirs in expected.items():
        ours = parsed.modules[key]
        assert ours.rank == theirs.r["default"]
        assert ours.scale == pytest.approx(theirs.scaling["default"], rel=1e-12)
        np.testing.assert_array_equal(ours.a, theirs.lora_A["default"].weight.detach().numpy())
        np.testing.assert_array_equal(ours.b, theirs.lora_B["default"].weight.detach().numpy())
        xi = x[: ours.a.shape[1]]
        delta = theirs.get_delta_weight("default").detach().numpy() @ xi
        np.testing.assert_allclose(ours.scale * ours.b @ (ours.a @ xi), delta, atol=1e-5)


def test_scales_follow_alpha_over_r_rslora_and_patterns(tiny, tmp_path):
    """The formula itself, not only agreement with PEFT: alpha/r, alpha/sqrt(r), per pattern."""
    _, base = tiny["llama"]
    _, lora = CASES["patterns"]
    config, weights, _ = peft_adapter(tiny["llama"][0], tmp_path / "p", **lora)
    mods = parse_adapter(config, weights, base, **LIMITS).modules
    assert (mods[(0, "self_attn.q_proj")].rank, mods[(0, "self_attn.q_proj")].scale) == (8, 1.0)
    assert (mods[(1, "self_attn.q_proj")].rank, mods[(1, "self_attn.q_proj")].scale) == (2, 4.0)
    assert (mods[(1, "mlp.down_proj")].rank, mods[(1, "mlp.down_proj")].scale) == (6, 0.5)
    assert mods[(1, "self_attn.k_proj")].scale == 1.5 / 4
    config, weights, _ = peft_adapter(tiny["llama"][0], tmp_path / "r", **CASES["all-rslora"][1])
    mods = parse_adapter(config, weights, base, **LIMITS).modules
    assert all(w.scale == 6 / 2.0 for w in mods.values())


def test_default_segment_half_precision_and_module_outputs(tiny, tmp_path):
    """``.default`` key spellings and F16/BF16 files parse; the parsed delta is the change in
    PEFT's module output."""
    from safetensors.torch import save

    model, base = tiny["llama"]
    config, weights, pm = peft_adapter(model, tmp_path, r=4, lora_alpha=8, target_modules=ATTN)
    tensors = read_safetensors(weights).tensors
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    assert parse_adapter(config, write_safetensors(renamed), base, **LIMITS).modules.keys() == (
        parse_adapter(config, weights, base, **LIMITS).modules.keys()
    )
    for dtype in (torch.float16, torch.bfloat16):
        half = save({k: torch.from_numpy(v).to(dtype) for k, v in tensors.items()})
        parsed = parse_adapter(config, half, base, **LIMITS)
        layer = pm.base_model.model.model.layers[1].self_attn.v_proj
        want = layer.lora_A["default"].weight.detach().to(dtype).float().numpy()
        np.testing.assert_array_equal(parsed.modules[(1, "self_attn.v_proj")].a, want)
    ours = parse_adapter(config, weights, base, **LIMITS).modules[(1, "self_attn.v_proj")]
    x = torch.randn(5, base.hidden_size)
    with torch.no_grad():
        change = (layer(x) - layer.base_layer(x)).numpy()
    np.testing.assert_allclose(ours.scale * (x.numpy() @ ours.a.T) @ ours.b.T, change, atol=1e-5)


def test_mlx_lm_adapter_converts_to_peft_orientation(tiny):
    """An adapter laid out by mlx-lm's own linear_to_lora_layers: the same names, and
    y = base(x) + scale * (x @ lora_a) @ lora_b becomes a = lora_a.T, b = lora_b.T."""
    mx = pytest.importorskip("mlx.core")
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from mlx_lm.tuner.utils import linear_to_lora_layers

    _, base = tiny["llama"]
    args = llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=256,
    )  # fmt: skip
    mlx_model = llama.Model(args)
    mlx_model.freeze()  # as mlx_lm.lora does: only the LoRA matrices stay trainable
    params = {
        "rank": 4,
        "scale": 10.0,
        "dropout": 0.0,
        "keys": ["self_attn.q_proj", "mlp.down_proj"],
    }
    linear_to_lora_layers(mlx_model, 1, params)
    lora = {k: np.array(v) for k, v in tree_flatten(mlx_model.trainable_parameters())}
    rng = np.random.default_rng(2)
    lora = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in lora.items()}
    mlx_model.load_weights([(k, mx.array(v)) for k, v in lora.items()], strict=False)
    config = json.dumps({"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": params})
    parsed = parse_adapter(config.encode(), write_safetensors(lora), base, **LIMITS)
    assert parsed.format == "mlx-lm" and parsed.rank == 4
    assert set(parsed.modules) == {(1, "self_attn.q_proj"), (1, "mlp.down_proj")}
    ours = parsed.modules[(1, "mlp.down_proj")]
    np.testing.assert_array_equal(ours.a, lora["model.layers.1.mlp.down_proj.lora_a"].T)
    np.testing.assert_array_equal(ours.b, lora["model.layers.1.mlp.down_proj.lora_b"].T)
    assert ours.scale == 10.0
    x = rng.standard_normal((3, base.intermediate_size)).astype(np.float32)
    layer = mlx_model.model.layers[1].mlp.down_proj
    change = np.array(layer(mx.array(x)) - layer.linear(mx.array(x)))
    np.testing.assert_allclose(ours.scale * (x @ ours.a.T) @ ours.b.T, change, rtol=1e-5, atol=1e-4)


def problems_of(config, weights, base, **limits) -> list[str]:
    with pytest.raises(AdapterError) as info:
        parse_adapter(config, weights, base, **{**LIMITS, **limits})
    assert str(info.value) == "; ".join(info.value.problems)
    return info.value.problems


def good_peft(tiny, tmp_path):
    model, base = tiny["llama"]
    config, weights, _ = peft_adapter(model, tmp_path, r=4, lora_alpha=8, target_modules=ATTN)
    return json.loads(config), read_safetensors(weights).tensors, base


def test_every_weights_problem_is_named_at_once(tiny, tmp_path):
    cfg, t, base = good_peft(tiny, tmp_path)
    cfg["target_modules"] = ["q_proj", "k_proj", "v_proj", "gate_proj"]
    A, B = ".lora_A.weight", ".lora_B.weight"
    q0, k1, v0 = (
        f"{PREFIX}.0.self_attn.q_proj",
        f"{PREFIX}.1.self_attn.k_proj",
        f"{PREFIX}.0.self_attn.v_proj",
    )
    t[q0 + ".lora_A.default.weight"] = t[q0 + A]  # given twice
    t[f"{PREFIX}.7.self_attn.q_proj{A}"] = t[q0 + A]  # a layer the base lacks
    t[k1 + B] = np.full((32, 4), np.nan, np.float32)  # NaN, and out 32 where 32 fits k_proj
    t[v0 + A] = np.zeros((4, 48), np.float32)  # in 48, expected 64
    t[f"{PREFIX}.1.self_attn.v_proj{B}"] = np.zeros((32, 3), np.float32)  # B rank 3 vs A rank 4
    del t[f"{PREFIX}.1.self_attn.q_proj{B}"]  # A without B
    t[f"{PREFIX}.0.self_attn.c_attn{A}"] = t[q0 + A]  # unknown module
    t["base_model.model.lm_head.lora_A.weight"] = t[q0 + A]  # not a layer projection
    t[f"{PREFIX}.0.self_attn.k_proj{A}"] = np.zeros((32, 64), np.float32)  # rank 32
    t[f"{PREFIX}.0.self_attn.k_proj{B}"] = np.zeros((32, 32), np.float32)
    problems = problems_of(json.dumps(cfg).encode(), write_safetensors(t), base, max_bytes=100)
    text = "\n".join(problems)
    for needle in (
        "over the limit 100",
        f"given twice: {q0}{A} and {q0}.lora_A.default.weight",
        "weights for layer 7; the base has 2 layers",
        f"NaN or Inf values in: {k1}{B}",
        "self_attn.v_proj lora_A is [4, 48], expected [4, 64] (layer 0)",
        "self_attn.v_proj lora_A has rank 4 but lora_B has rank 3 (layer 1)",
        "self_attn.q_proj has lora_A but no lora_B (layer 1)",
        "unknown modules (adaptable: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
        ": self_attn.c_attn",
        "not LoRA weights of a layer's projection: base_model.model.lm_head.lora_A.weight",
        "weights for self_attn.o_proj, which the config does not target (layers 0-1)",
        "self_attn.k_proj has rank 32, over the limit of 16 (layer 0)",
        "self_attn.k_proj has rank 32, but the config says 4 (layer 0)",
        "the config targets mlp.gate_proj, but no weights do",
    ):
        assert needle in text, needle
    assert len(problems) == 13


BAD_CONFIGS = {
    "not json": (b"{r: 8", "adapter_config.json is not JSON"),
    "a list": (b"[1, 2]", "is a JSON list, not an object"),
    "no format": (b'{"r": 8}', "neither PEFT (peft_type) nor mlx-lm"),
    "mlx dora": (
        b'{"fine_tune_type": "dora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 2}}',
        "fine_tune_type 'dora' is not supported",
    ),
    "mlx fields": (
        b'{"num_layers": "2", "lora_parameters": {"rank": 0, "keys": ["lm_head"]}}',
        "num_layers must be an integer|rank must be a positive integer|lacks scale"
        "|unknown target modules lm_head",
    ),
}
PEFT_BAD = {
    "peft_type": ("IA3", 'peft_type must be "LORA"'),
    "r": (2.5, "r must be a positive integer, got 2.5"),
    "lora_alpha": (1e400, "lora_alpha must be a finite number"),
    "target_modules": (
        ["lm_head", "embed_tokens", "c_attn", "q_proj"],
        "unknown target modules lm_head, embed_tokens, c_attn",
    ),
    "bias": ("all", 'bias must be "none"'),
    "modules_to_save": (["lm_head"], "modules_to_save is set"),
    "use_dora": (True, "use_dora is set"),
    "layers_to_transform": ([0, 7], "layers_to_transform names layers [7]"),
    "rank_pattern": ({"q_(proj": 2}, "rank_pattern key"),
    "use_rslora": ("yes", "use_rslora must be true or false"),
    "init_lora_weights": ("pissa", "rewrites the base weights"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_configs_are_named(tiny, tmp_path, case):
    _, t, base = good_peft(tiny, tmp_path)
    config, needles = BAD_CONFIGS[case]
    text = "\n".join(problems_of(config, write_safetensors(t), base))
    for needle in needles.split("|"):
        assert needle in text


def test_every_peft_config_problem_is_named_at_once(tiny, tmp_path):
    cfg, _, base = good_peft(tiny, tmp_path)
    cfg.update({key: value for key, (value, _) in PEFT_BAD.items()})
    problems = problems_of(json.dumps(cfg).encode(), b"\x00" * 12, base)
    text = "\n".join(problems)
    for key, (_, needle) in PEFT_BAD.items():
        assert needle in text, key
    assert "weights are not a safetensors file" in text


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("target_modules", r"(.*)*x"),
        ("target_modules", r".*.*.*.*\.q_proj"),
        ("exclude_modules", r"(.|.)*k_proj"),
        ("rank_pattern", {r"(\w+_)*proj": 2}),
        ("layers_pattern", r"(la|yers)+"),
    ],
)
def test_regexes_that_could_backtrack_for_minutes_are_refused(tiny, tmp_path, key, value):
    """PEFT matches these with Python's backtracking engine; ``(.*)*x`` alone would hang."""
    cfg, t, base = good_peft(tiny, tmp_path)
    cfg.update({key: value}, **({"layers_to_transform": [0]} if key == "layers_pattern" else {}))
    text = "\n".join(problems_of(json.dumps(cfg).encode(), write_safetensors(t), base))
    assert "repeat" in text


def test_size_alone_is_413_and_with_others_400(tiny, tmp_path):
    cfg, t, base = good_peft(tiny, tmp_path)
    config, weights = json.dumps(cfg).encode(), write_safetensors(t)
    with pytest.raises(AdapterError) as info:
        parse_adapter(config, weights, base, max_rank=16, max_bytes=1000)
    assert info.value.status == 413 and len(info.value.problems) == 1
    with pytest.raises(AdapterError) as info:
        parse_adapter(config, weights, base, max_rank=2, max_bytes=1000)
    assert info.value.status == 400


def test_garbage_only_ever_raises_adapter_error(tiny, tmp_path):
    cfg, t, base = good_peft(tiny, tmp_path)
    config, weights = json.dumps(cfg).encode(), write_safetensors(t)
    rng = random.Random(0)
    uploads = [(config, weights[:n]) for n in (0, 7, 8, 9, 40, len(weights) // 2, len(weights) - 1)]
    uploads += [(config[:n], weights) for n in (0, 1, len(config) // 2)]
    uploads += [(config, rng.randbytes(rng.randrange(1, 400))) for _ in range(50)]
    uploads += [(rng.randbytes(60), weights), (b"[" * 100000, b"{" * 100000)]
    for _ in range(100):  # flip header bytes: offsets, shapes, dtypes, names, JSON syntax
        broken = bytearray(weights)
        for _ in range(rng.randrange(1, 4)):
            broken[rng.randrange(8, 8 + 300)] = rng.randrange(256)
        uploads.append((config, bytes(broken)))
    odd = [None, True, -1, 0, 2.5, 10**400, "(", "x", [], ["("], [1], {}, {"(": 1}, {"q": "x"}]
    peft_keys = "r lora_alpha target_modules rank_pattern alpha_pattern layers_to_transform"
    for key in (peft_keys + " layers_pattern exclude_modules use_rslora").split():
        uploads += [(json.dumps({**cfg, key: value}).encode(), weights) for value in odd]
    mlx = {"num_layers": 2, "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0}}
    for key in ("num_layers", "lora_parameters", "fine_tune_type"):
        uploads += [(json.dumps({**mlx, key: value}).encode(), weights) for value in odd]
    for config_bytes, weights_bytes in uploads:
        try:
            parse_adapter(config_bytes, weights_bytes, base, **LIMITS)
        except AdapterError as e:
            assert e.problems and e.status in (400, 413)


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("", "empty"),
        ("a" * 65, "over the limit of 64"),
        ("../etc", "'..'"),
        ("a/b", "'/' or '\\'"),
        ("a\\b", "'/' or '\\'"),
        ("-x", "start with a letter or a digit"),
        ("my adapter!", "characters other than"),
        ("base-model", "the base model's name"),
    ],
)
def test_bad_names(name, needle):
    problems = validate_name(name, "base-model")
    assert problems and any(needle in p for p in problems)


def test_good_names():
    for name in ("sql-lora", "A.b_c-1", "x" * 64, "7"):
        assert validate_name(name, "base-model") == []
