"""LoRA throughput: 0, 1, 4 and 8 distinct adapters spread over 16 streams, against mlx_lm.server.

candlewick serves the Hugging Face folder with `--max-loras 8 --max-lora-rank 16`; N random
PEFT adapters (rank 16, all seven projections of every layer) are uploaded through
`POST /v1/adapters` and loadgen sends its requests round-robin over their names (N = 0: the base
model). Every adapter fits a device slot, so the number measured is the cost of gathering
per-token LoRA weights in a mixed batch, not of swapping. mlx_lm.server runs the same weights
written in its own format, picked per request by the `adapters` field (a folder path); it
reloads the model whenever that changes, so it serves one adapter's requests at a time.
Before the timed runs each server answers one short greedy probe with and without adapter 0:
the two servers must agree (same math), and the adapter must change the answer.

    python -m loadtests.bench_adapters --json adapters.json
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python -m ...
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from adapters.safetensors_io import write_safetensors
from loadtests.bench_server import (
    CANDLEWICK,
    MLX_LM,
    PROMPT,
    WARM,
    Extra,
    Run,
    candlewick_argv,
    environment,
    eos_ban,
    free_port,
    load,
    markdown,
    mlx_lm_argv,
    ms,
    running,
    summary,
)
from loadtests.export_hf import export
from loadtests.loadgen import format_table

PROJECTIONS = (
    *(f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
    *(f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")),
)
PROBE = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}


def projection_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) features of each targeted projection, from the folder's config.json."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv)}
    shapes |= {"o_proj": (q, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter)}
    shapes |= {"down_proj": (inter, hidden)}
    return {p: shapes[p.split(".")[1]] for p in PROJECTIONS}


def write_adapter(out: Path, seed: int, config: dict[str, Any], rank: int, alpha: float) -> None:
    """One random adapter twice: `out/peft` (A [r, in], B [out, r]) and `out/mlx` (mlx-lm's
    lora_a [in, r] = A.T, lora_b [r, out] = B.T, scale = alpha / r)."""
    rng = np.random.default_rng(seed)
    shapes = projection_shapes(config)
    peft: dict[str, np.ndarray] = {}
    mlx: dict[str, np.ndarray] = {}
    for layer in range(config["num_hidden_layers"]):
        for proj, (fan_in, fan_out) in shapes.items():
            a = rng.normal(0, fan_in**-0.5, (rank, fan_in)).astype(np.float32)
            b = rng.normal(0, 0.02, (fan_out, rank)).astype(np.float32)
            peft[f"base_model.model.model.layers.{layer}.{proj}.lora_A.weight"] = a
            peft[f"base_model.model.model.layers.{layer}.{proj}.lora_B.weight"] = b
            mlx[f"model.layers.{layer}.{proj}.lora_a"] = np.ascontiguousarray(a.T)
            mlx[f"model.layers.{layer}.{proj}.lora_b"] = np.ascontiguousarray(b.T)
    modules = sorted({p.split(".")[1] for p in PROJECTIONS})
    peft_config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "bias": "none"}
    peft_config |= {"target_modules": modules, "task_type": "CAUSAL_LM"}
    lora = {"rank": rank, "scale": alpha / rank, "dropout": 0.0, "keys": list(PROJECTIONS)}
    mlx_config = {"fine_tune_type": "lora", "num_layers": config["num_hidden_layers"]}
    mlx_config |= {"lora_parameters": lora}
    for folder, cfg, name, tensors in (
        (out / "peft", peft_config, "adapter_model.safetensors", peft),
        (out / "mlx", mlx_config, "adapters.safetensors", mlx),
    ):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        (folder / name).write_bytes(write_safetensors(tensors))


def upload(url: str, name: str, folder: Path) -> None:
    files = {
        "config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
        "weights": (
            "adapter_model.safetensors",
            (folder / "adapter_model.safetensors").read_bytes(),
        ),
    }
    resp = httpx.post(f"{url}/v1/adapters", data={"name": name}, files=files, timeout=300)
    if resp.status_code != 201:
        raise RuntimeError(f"uploading {name}: HTTP {resp.status_code}: {resp.text[:500]}")


def probe(url: str, body: dict[str, Any]) -> str:
    resp = httpx.post(f"{url}/v1/completions", json={**PROBE, **body}, timeout=300)
    resp.raise_for_status()
    return resp.json()["choices"][0]["text"]


def serve_and_load(
    system: str, args: argparse.Namespace, names: list[str], root: Path
) -> tuple[dict[int, Run], dict[str, str]]:
    """Starts `system`, answers the probes, then one load run per adapter count."""
    port = free_port()
    extra: Extra = {}
    if system == CANDLEWICK:
        flags = ("--max-loras", "8", "--max-lora-rank", str(args.rank))
        argv, base = candlewick_argv(args.hf, port, root / "data", *flags), CANDLEWICK
        ban = eos_ban(args.hf)  # as mlx-lm's probes, so EOS cannot end one early
        bodies = {base: {"model": base, **ban}, names[0]: {"model": names[0], **ban}}
    else:
        argv, base = mlx_lm_argv(args.hf, port), str(args.hf)  # its default model's key
        extra[base] = eos_ban(args.hf)
        for name in names:
            extra[name] = {"model": base, "adapters": str(root / name / "mlx"), **extra[base]}
        bodies = {base: extra[base] | {"model": base}, names[0]: extra[names[0]]}
    out: dict[int, Run] = {}
    with running(argv, args.logs / f"adapters-{system}.log", args.start_timeout) as server:
        if system == CANDLEWICK:
            for name in names:
                upload(server.url, name, root / name / "peft")
        texts = {"base" if k == base else k: probe(server.url, b) for k, b in bodies.items()}
        warm = tuple(names) if system == CANDLEWICK else (base,)  # every adapter into a slot
        load(server, warm[0], 8, args, extra, models=warm, requests=8, max_tokens=2, seed=WARM)
        for n in args.counts:
            models = tuple(names[:n]) or (base,)
            fresh = {"models": models, "seed": args.seed + 100 + n}  # no prefix-cache hits
            out[n] = run = load(server, models[0], args.streams, args, extra, **fresh)
            print(format_table([(f"{system}, {n} adapters", run.report)]), flush=True)
    return out, texts


def adapter_table(runs: dict[tuple[str, int], Run]) -> str:
    rows = []
    for (system, n), run in runs.items():
        r, base, other = run.report, runs.get((system, 0)), runs.get((MLX_LM, n))
        vs_base = f"{r.output_tok_s / base.report.output_tok_s:.2f}" if base else ""
        mlx = other.report.output_tok_s if system == CANDLEWICK and other else 0
        rows.append([str(n), system, ms(r.ttft_p50), ms(r.ttft_p99), ms(r.itl_p50)])
        rows[-1] += [f"{r.output_tok_s:.2f}", vs_base, f"{r.output_tok_s / mlx:.2f}" if mlx else ""]
        rows[-1] += [f"{run.others_cpu:.0%}"]
    head = ["adapters", "server", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "output tok/s"]
    return markdown([*head, "vs base only", "candlewick / mlx-lm", "others' CPU"], rows)


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {**environment(), "command": " ".join(sys.argv)}  # rev at start
    if not (args.hf / "config.json").is_file():
        export(None, args.hf, "float32")  # the default GGUF model, dequantized
    args.logs.mkdir(parents=True, exist_ok=True)
    config = json.loads((args.hf / "config.json").read_text())
    names = [f"lora-{i}" for i in range(max(args.counts))]
    runs: dict[tuple[str, int], Run] = {}
    probes: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        root = Path(tmp)
        for i, name in enumerate(names):
            write_adapter(root / name, args.seed + i, config, args.rank, 2.0 * args.rank)
        for system in args.systems:
            by_count, probes[system] = serve_and_load(system, args, names, root)
            runs |= {(system, n): r for n, r in by_count.items()}
    result["adapter_table"] = adapter_table(runs)
    result["probes"] = probes
    if len(probes) == 2:  # mlx-lm drops the first token's leading space; the tokens match
        a, b = probes.values()
        result["probes_agree"] = {k: a[k].strip() == b[k].strip() for k in a}
    result["runs"] = {f"{s}@{n}": summary(r) for (s, n), r in runs.items()}
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", type=Path, default=Path("/tmp/candlewick-bench-hf"))
    p.add_argument("--counts", default="0,1,4,8", help="distinct adapters per run")
    p.add_argument("--systems", default=f"{CANDLEWICK},{MLX_LM}")
    p.add_argument("--streams", type=int, default=16, help="concurrent streams (and requests)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=PROMPT, help="loadgen's (128 tokens)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="per request, seconds")
    p.add_argument("--start-timeout", type=float, default=300, help="per server, seconds")
    p.add_argument("--logs", type=Path, default=Path("/tmp/candlewick-bench-logs"))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.counts = [int(n) for n in args.counts.split(",")]
    args.systems = [s for s in args.systems.split(",") if s]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the servers' cleanup
    result = run(args)
    print(result["adapter_table"])
    for system, texts in result["probes"].items():
        print(f"{system} probes: {texts}")
    print(f"servers agree on the probes: {result.get('probes_agree')}")
    print({k: result[k] for k in ("machine", "versions", "candlewick_rev", "openblas_preloaded")})
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
