"""LoRA training tokens/s: candlewick's trainer against `mlx_lm.lora` on the same model, data and
settings, in alternating rounds (the machine is shared; alternation spreads the noise). With
`--serving`: serving throughput while a fine-tuning job runs against idle (below).

The model is a random llama written by `loadtests/make_model.py` (float32 on disk, so both
compute in float32); the data are single-turn chat examples of 100-160 tokens whose prompt is
masked (mlx-lm's `--mask-prompt`, our assistant-only loss). Settings: rank 16, scale 2 (alpha
32), the four attention projections of every layer, AdamW at 1e-4, batch 8, no dropout, no
checkpointing. Tokens/s counts the examples' own tokens (no padding) over the training steps'
time, the first `--warmup` steps left out; mlx-lm's figure is its own per-step tok/s report.

    python -m loadtests.bench_training --out /tmp/bench-training --steps 12 --rounds 2
    python -m loadtests.bench_training --preset llama3-8b-q4 ...   # on a GPU box

`--serving`: one `candlewick serve` of a make_model preset (default `llama-50m`, float32 on the
CPU) under loadgen's `--streams` streaming chats (greedy, fixed length), in rounds that alternate
"idle" (nothing else runs) and "training" (a fine-tuning job on the data above, same settings as
the trainer's, started before the load and cancelled after it). Each round reports the output
tok/s, TTFT and ITL, and what training did meanwhile (its tokens/s over the load's wall time).

    python -m loadtests.bench_training --serving --out /tmp/bench-ft-serving --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from engine.cpu_blas import reexec_with_blas

SHAPE = dict(hidden=512, layers=10, heads=8, kv_heads=4, intermediate=1536, vocab=16384)
KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
RANK, SCALE, LR, BATCH = 16, 2.0, 1e-4, 8
CANDLEWICK = "candlewick"  # the served model's name (loadtests.bench_server)


def make_folder(out: Path, preset: str | None) -> Path:
    """The model folder: a preset of make_model, or the 48M llama in float32."""
    import dataclasses

    import mlx.core as mx

    from loadtests import make_model as mm

    folder = out / (preset or "llama-48m-f32")
    if (folder / "config.json").exists():
        return folder
    if preset is not None:
        mm.make_model(preset, folder)
        return folder
    p = dataclasses.replace(mm.PRESETS["tiny"], **SHAPE)
    folder.mkdir(parents=True, exist_ok=True)
    mm.write_configs(folder, p, mm.build_tokenizer(p))
    mm.write_weights(folder, p, seed=0, std=0.02, workers=2)
    for f in folder.glob("*.safetensors"):
        weights = {k: v.astype(mx.float32) for k, v in mx.load(str(f)).items()}
        mx.save_safetensors(str(f), weights)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
    return folder


def make_data(out: Path, n: int = 128) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    words = [
        "the",
        "a",
        "of",
        "sky",
        "blue",
        "red",
        "river",
        "stone",
        "light",
        "quiet",
        "north",
        "garden",
        "paper",
    ]
    lines = []
    for _ in range(n):
        q = " ".join(rng.choice(words, int(rng.integers(40, 70))))
        a = " ".join(rng.choice(words, int(rng.integers(15, 30))))
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        lines.append(json.dumps({"messages": messages}))
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name in ("train", "valid"):
        (data / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return data


def ours(folder: Path, data: Path, steps: int, warmup: int) -> dict:
    from engine.loader.load import load_model
    from engine.training.data import chat_example
    from engine.training.lora import LoRASpec, init_lora, projection_shapes
    from engine.training.trainer import Trainer, TrainingConfig

    loaded = load_model(folder)
    records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    examples = [chat_example(loaded.tokenizer, r["messages"]) for r in records]
    spec = LoRASpec(RANK, RANK * SCALE, tuple(KEYS))
    config = TrainingConfig(learning_rate=LR, n_epochs=8, batch_size=BATCH,
                            micro_batch_size=BATCH, schedule="constant")  # fmt: skip
    trainer = Trainer(
        loaded.model, examples, init_lora(projection_shapes(loaded.model), spec, 0), config
    )
    tokens = seconds = 0.0
    for i in range(steps):
        r = trainer.train_step()
        if i >= warmup:
            tokens, seconds = tokens + r.tokens, seconds + r.seconds
    return {"tokens_per_second": tokens / seconds, "dtype": str(loaded.dtype)}


def theirs(folder: Path, data: Path, steps: int, warmup: int, out: Path) -> dict:
    config = out / "mlx_lm_lora.yaml"
    config.write_text(json.dumps({"lora_parameters": {"rank": RANK, "scale": SCALE,
                                                      "dropout": 0.0, "keys": KEYS}}))  # fmt: skip
    cmd = [
        sys.executable, "-m", "mlx_lm", "lora", "--model", str(folder), "--train",
        "--data", str(data), "--fine-tune-type", "lora", "--optimizer", "adamw",
        "--mask-prompt", "--num-layers", "-1", "--batch-size", str(BATCH),
        "--iters", str(steps), "--learning-rate", str(LR), "--steps-per-report", "1",
        "--steps-per-eval", str(10 * steps), "--val-batches", "1",
        "--adapter-path", str(out / "mlx_lm_adapter"), "-c", str(config),
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True)
    (out / "mlx_lm_lora.log").write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        raise RuntimeError(f"mlx_lm lora exited with {run.returncode}:\n{run.stderr[-3000:]}")
    rates = mlx_lm_rates(run.stdout + run.stderr)
    kept = rates[warmup:]
    return {"tokens_per_second": sum(kept) / len(kept), "reports": len(rates)}


def mlx_lm_rates(output: str) -> list[float]:
    """The tok/s of each training row of `mlx_lm.lora`'s table (iter, loss, trend, tok/s,
    tokens so far; colours stripped, thousands written "2,516")."""
    rates = []
    for line in re.sub(r"\x1b\[[0-9;]*m", "", output).splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0].isdigit() and parts[1] != "val":
            rates.append(float(parts[3].replace(",", "")))
    return rates


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    found = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def start_job(http: httpx.Client, file_id: str, seed: int) -> tuple[str, float]:
    """A job that outlasts the round, once its first step is done; its id and step seconds."""
    short = [k.split(".")[1] for k in KEYS]
    body = {
        "model": CANDLEWICK, "training_file": file_id, "seed": seed,
        "hyperparameters": {"n_epochs": 50, "batch_size": BATCH},
        "method": {"type": "supervised",
                   "lora": {"rank": RANK, "alpha": RANK * SCALE, "target_modules": short}},
    }  # fmt: skip
    job = http.post("/v1/fine_tuning/jobs", json=body).raise_for_status().json()["id"]
    while True:
        events = http.get(f"/v1/fine_tuning/jobs/{job}/events", params={"limit": 5}).json()
        steps = [e["data"] for e in events["data"] if e["type"] == "metrics"]
        if steps:
            return job, steps[0]["tokens"] / steps[0]["tokens_per_second"]
        time.sleep(0.5)


def round_row(run, trained_tokens: float) -> dict:
    rep = run.report
    ms = {f"{k}_ms": round(1e3 * getattr(rep, k)) for k in ("ttft_p50", "itl_p50", "itl_p99")}
    return {
        "output_tok_s": round(rep.output_tok_s, 1),
        **ms,
        "errors": rep.errors,
        "training_tok_s": round(trained_tokens / rep.wall_s, 1),
        "wall_s": round(rep.wall_s, 1),
        "others_cpu": round(run.others_cpu, 2),
    }


def serving(args: argparse.Namespace) -> int:
    from loadtests.bench_server import candlewick_argv, environment, free_port, load, running
    from loadtests.make_model import make_model

    folder = args.out / args.preset
    if not (folder / "config.json").is_file():
        make_model(args.preset, folder, workers=1)
    data = make_data(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {**environment(), "command": " ".join(sys.argv), "rounds": []}
    argv = candlewick_argv(folder, free_port(), args.out / "data-dir")
    shutil.rmtree(args.out / "data-dir", ignore_errors=True)
    with running(argv, args.out / "server.log", 300) as server:
        http = httpx.Client(base_url=server.url, timeout=60)
        upload = {"file": ("train.jsonl", (data / "train.jsonl").read_bytes())}
        file_id = http.post("/v1/files", files=upload, data={"purpose": "fine-tune"}).json()["id"]
        load(server, CANDLEWICK, 4, args, {}, max_tokens=4, seed=args.seed + 10_000, chat=True)
        for r in range(args.rounds):
            for mode in ("idle", "training") if r % 2 == 0 else ("training", "idle"):
                job, step_s = start_job(http, file_id, r) if mode == "training" else (None, 0)
                tokens = metric(server.url, "candlewick_fine_tuning_tokens_total")
                seed = args.seed + 2 * r + (mode == "idle")
                run = load(server, CANDLEWICK, args.streams, args, {}, chat=True,
                           requests=args.requests, seed=seed)  # fmt: skip
                trained = metric(server.url, "candlewick_fine_tuning_tokens_total") - tokens
                if job is not None:
                    http.post(f"/v1/fine_tuning/jobs/{job}/cancel").raise_for_status()
                    time.sleep(step_s + 1)  # the unit in flight ends; the work stops at the next
                row = {"round": r + 1, "mode": mode, **round_row(run, trained)}
                result["rounds"].append(row)
                print(json.dumps(row), flush=True)
    rates = {m: [x["output_tok_s"] for x in result["rounds"] if x["mode"] == m]
             for m in ("idle", "training")}  # fmt: skip
    means = {m: sum(v) / len(v) for m, v in rates.items()}
    result["ratio"] = means["training"] / means["idle"]
    print(f"idle {means['idle']:.1f} tok/s, training {means['training']:.1f} tok/s: "
          f"{result['ratio']:.2f}x idle (goal >= 0.5x)")  # fmt: skip
    (args.out / "serving.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    reexec_with_blas()  # the same BLAS for both (the mlx-lm subprocess inherits it)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default=None, help="a make_model preset (default: a 48M llama)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--serving", action="store_true", help="serving while a job runs, vs idle")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32, help="per round (--serving)")
    for flag, default in (("--prompt-tokens", 170), ("--max-tokens", 64), ("--seed", 0)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)
    if args.serving:
        args.preset = args.preset or "llama-50m"
        return serving(args)
    folder = make_folder(args.out, args.preset)
    data = make_data(args.out)
    import mlx.core as mx
    import mlx_lm

    results = []
    for r in range(args.rounds):
        for name in ("candlewick", "mlx_lm") if r % 2 == 0 else ("mlx_lm", "candlewick"):
            start = time.time()
            if name == "candlewick":
                got = ours(folder, data, args.steps, args.warmup)
                mx.clear_cache()  # the trainer's freed buffers: mlx-lm's process needs the memory
            else:
                got = theirs(folder, data, args.steps, args.warmup, args.out)
            got |= {"round": r, "tool": name, "wall_s": round(time.time() - start, 1)}
            results.append(got)
            print(json.dumps(got), flush=True)
    for name in ("candlewick", "mlx_lm"):
        rates = [x["tokens_per_second"] for x in results if x["tool"] == name]
        print(f"{name}: mean {sum(rates) / len(rates):.1f} tokens/s over {len(rates)} rounds")
    print(f"mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, BLAS {os.environ.get('LD_PRELOAD')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
