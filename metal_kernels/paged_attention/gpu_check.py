"""Parity sweep and timing for the paged attention kernel on whatever GPU this machine has.

    python -m metal_kernels.paged_attention.gpu_check --out paged.json

Self-contained (no pytest): the GPU machines may lack it. The same sweep backs the pytest parity
tests, so CI's CPU run and a GPU run check the same cases. Parity compares the kernel and the
reference against a float64 numpy attention; timing compares the paged kernel with MLX's fused
SDPA on contiguous K/V (no paging: the bound a paged kernel should approach) and with the
reference's gather path (what the engine ran before), at one context length and several batches.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlx.core as mx
import numpy as np

from metal_kernels.paged_attention import reference
from metal_kernels.paged_attention.dispatch import (
    TOLERANCE,
    Signature,
    device_kernel,
    get_dispatcher,
    takes_split_plans,
)
from metal_kernels.paged_attention.reference import PagedCase, random_case

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def naive_attention(case: PagedCase) -> np.ndarray:
    """Float64 attention over exactly the visible tokens, one (sequence, head) at a time.

    [B, H, 1, D]; a sequence of length 0 gives zeros (the contract).
    """
    q = np.array(case.q.astype(mx.float32), np.float64)[:, :, 0]  # [B, H, D]
    kp = np.array(case.k_pool.astype(mx.float32), np.float64)  # [slots, Hkv, D]
    vp = np.array(case.v_pool.astype(mx.float32), np.float64)
    tables, lens = np.array(case.block_tables), np.array(case.seq_lens)
    B, H, D = q.shape
    G, bs = H // kp.shape[1], case.block_size
    out = np.zeros((B, H, 1, D))
    for b in range(B):
        hi = min(int(lens[b]), tables.shape[1] * bs)
        lo = max(0, int(lens[b]) - case.window) if case.window else 0
        t = np.arange(lo, hi)
        slots = tables[b, t // bs] * bs + t % bs
        for h in range(H):
            if len(t) == 0:
                continue
            s = kp[slots, h // G] @ q[b, h] * case.scale  # [L]
            p = np.exp(s - s.max())
            out[b, h, 0] = (p / p.sum()) @ vp[slots, h // G]
    return out


def max_error(got: mx.array, want: np.ndarray) -> float:
    """max |got - want| / max(1, |want|); NaN or inf count as infinite."""
    err = np.abs(np.array(got.astype(mx.float32), np.float64) - want) / np.maximum(1, np.abs(want))
    return float(np.where(np.isfinite(err), err, np.inf).max())


def lengths_for(block_size: int, rng: np.random.Generator) -> list[int]:
    """The edges a paged kernel gets wrong: one token, a block's edges, and a long random one."""
    return [1, block_size - 1, block_size, block_size + 1, int(rng.integers(2, 12 * block_size))]


def sweep_cases(full: bool, seed: int = 0):
    """Random cases: every dtype x GQA ratio (1, 2, 4, 8) x block size (8, 16, 32) x window
    (None, small) at head dim 128 (64 on the CPU's short sweep); with ``full`` also head dims
    64, 96 and 256 on fewer combinations (each new head dim compiles new kernel variants)."""
    rng = np.random.default_rng(seed)
    combos = [
        (dt, g, bs, 128 if full else 64, w)
        for dt, g, bs, w in itertools.product(DTYPES.values(), (1, 2, 4, 8), (8, 16, 32), (None, 7))
    ]
    if full:
        for dt, d, g, w in itertools.product(
            (mx.float16, mx.bfloat16), (64, 96, 256), (1, 4), (None, 19)
        ):
            combos.append((dt, g, 16, d, w))
    for i, (dt, g, bs, d, w) in enumerate(combos):
        lens = lengths_for(bs, rng)
        if i % 4 == 0:
            lens.append(0)
        hkv = int(rng.choice([1, 2, 4]))
        yield random_case(
            lens, num_kv_heads=hkv, gqa=g, head_dim=d, block_size=bs, dtype=dt, window=w, seed=i
        )


def parity(kernel, full: bool) -> dict:
    """Per dtype: the worst error of the kernel (under each split plan) and of the reference."""
    report = {
        name: {"cases": 0, "kernel": 0.0, "reference": 0.0, "failures": []} for name in DTYPES
    }
    for case in sweep_cases(full):
        name = str(case.q.dtype).split(".")[-1]
        row, tol = report[name], TOLERANCE[case.q.dtype]
        want = naive_attention(case)
        ref_err = max_error(reference.paged_decode_attention(*case.args(), **case.kwargs()), want)
        row["reference"] = max(row["reference"], ref_err)
        if ref_err > tol:
            row["failures"].append(f"reference {case.describe()}: {ref_err:.3g}")
        plans = [{}] if kernel else []
        if kernel and takes_split_plans(kernel):
            plans += [{"num_splits": 1, "unroll": 4}, {"num_splits": 3, "unroll": 1}]
        for extra in plans:
            err = max_error(kernel(*case.args(), **case.kwargs(), **extra), want)
            row["kernel"] = max(row["kernel"], err)
            if err > tol:
                row["failures"].append(f"{case.describe()} {extra}: {err:.3g}")
        row["cases"] += 1
    return report


def chain(step, q: mx.array, group: int) -> mx.array:
    """``group`` calls, each taking the previous one's output as its query (built, not run)."""
    x = q
    for _ in range(group):
        x = step(x)
    return x


def bench(step, q: mx.array, iters: int = 30, group: int = 20) -> float:
    """Microseconds per call on the device. Each call's output is the next call's query, so the
    ``group`` calls run one after another as a model's layers do (independent calls may run
    concurrently on the GPU, which flatters a kernel that leaves it half idle). The chain is
    built in Python untimed, then evaluated and timed; the median over ``iters`` chains."""
    mx.eval(chain(step, q, 2))
    mx.synchronize()
    times = []
    for _ in range(iters):
        x = chain(step, q, group)
        start = time.perf_counter()
        mx.eval(x)
        mx.synchronize()
        times.append((time.perf_counter() - start) / group * 1e6)
    return float(np.median(times))


def bench_call(step, q: mx.array, iters: int = 20, group: int = 10) -> float:
    """Microseconds per call as above, building the calls in Python included."""
    mx.eval(chain(step, q, 2))
    mx.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        mx.eval(chain(step, q, group))
    mx.synchronize()
    return (time.perf_counter() - start) / (iters * group) * 1e6


COLD_BYTES = 256 << 20  # well over the L2 of an H100/H200 (50 MB)


def time_batch(kernel, B: int, ctx: int, dtype=mx.float16, splits=()) -> dict:
    """Llama-3-8B-like heads (32 query, 8 kv, dim 128), block size 16, blocks in shuffled order.

    Calls take turns over enough copies of K/V that together exceed COLD_BYTES, so every call
    reads its keys and values from device memory, as in a model whose other layers have pushed
    them out of L2. (One sequence of 8k tokens is 33 MB and would otherwise stay in L2.)
    """
    H, Hkv, D, bs = 32, 8, 128, 16
    nblk = ctx // bs
    ids = np.random.default_rng(B).permutation(np.arange(1, B * nblk + 1))
    tables = mx.array(ids.reshape(B, nblk).astype(np.int32))
    shape = ((B * nblk + 1) * bs, Hkv, D)
    q = mx.random.normal((B, H, 1, D)).astype(dtype)
    lens = mx.full((B,), ctx, mx.int32)
    kv_bytes = 2 * B * Hkv * ctx * D * dtype.size
    copies = max(1, min(8, -(-COLD_BYTES // kv_bytes)))
    sets = []
    for _ in range(copies):
        k_pool, v_pool = (mx.random.normal(shape).astype(dtype) for _ in range(2))
        k_cont, v_cont = (
            reference.gather_kv(k_pool, tables, bs),
            reference.gather_kv(v_pool, tables, bs),
        )
        mx.eval(k_pool, v_pool, k_cont, v_cont)  # k_cont, v_cont: [B, Hkv, L, D]
        sets.append((k_pool, v_pool, k_cont, v_cont))
    turn = itertools.count()

    def kv():
        return sets[next(turn) % copies]

    kw = {"block_size": bs, "window": None, "scale": D**-0.5}
    row = {"batch": B, "context": ctx, "dtype": str(dtype), "kv_bytes": kv_bytes, "copies": copies}
    sdpa = mx.fast.scaled_dot_product_attention

    def contiguous(x):
        _, _, k_cont, v_cont = kv()
        return sdpa(x, k_cont, v_cont, scale=D**-0.5)

    def paged(fn, x, **extra):
        k_pool, v_pool, _, _ = kv()
        return fn(x, k_pool, v_pool, tables, lens, **kw, **extra)

    row["sdpa_contiguous_us"] = bench(contiguous, q)
    row["sdpa_contiguous_GBps"] = kv_bytes / row["sdpa_contiguous_us"] / 1e3
    row["sdpa_contiguous_call_us"] = bench_call(contiguous, q)
    row["reference_gather_us"] = bench(
        functools.partial(paged, reference.paged_decode_attention), q
    )
    if kernel:
        row["paged_kernel_us"] = bench(functools.partial(paged, kernel), q)
        row["paged_kernel_GBps"] = kv_bytes / row["paged_kernel_us"] / 1e3
        row["paged_kernel_call_us"] = bench_call(functools.partial(paged, kernel), q)
        for u in (1, 4):  # the default unroll is 2: is it the right one here?
            row[f"paged_kernel_unroll{u}_us"] = bench(functools.partial(paged, kernel, unroll=u), q)
        for s in splits:
            row[f"paged_kernel_splits{s}_us"] = bench(
                functools.partial(paged, kernel, num_splits=s), q
            )
    return row


def device_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{platform.machine()} {platform.system()} ({mx.default_device()})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the JSON report here")
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--quick", action="store_true", help="the short sweep (CPU smoke test)")
    ap.add_argument("--no-parity", dest="parity", action="store_false", help="timing only")
    ap.add_argument("--splits", default="", help="also time these split counts, e.g. 8,16,64")
    args = ap.parse_args(argv)
    backend, kernel = device_kernel()
    report = {"device": device_name(), "backend": backend, "mlx": mx.__version__}
    print(f"device: {report['device']}  backend: {backend}  mlx {mx.__version__}", flush=True)
    sig = Signature(mx.float16, 128, 16, 4, False)
    report["dispatcher_uses_kernel"] = get_dispatcher().uses_kernel(sig)
    print(f"dispatcher self-check ({sig}): uses kernel = {report['dispatcher_uses_kernel']}")
    report["parity"] = parity(kernel, full=not args.quick) if args.parity else {}
    print(f"\n{'dtype':<10}{'cases':>6}{'kernel max err':>16}{'reference max err':>19}  tol")
    for name, row in report["parity"].items():
        tol = TOLERANCE[DTYPES[name]]
        print(
            f"{name:<10}{row['cases']:>6}{row['kernel']:>16.3g}{row['reference']:>19.3g}  {tol:g}"
        )
        for failure in row["failures"][:10]:
            print("  FAIL", failure)
    batches = [int(b) for b in args.batches.split(",")]
    splits = [int(s) for s in args.splits.split(",") if s]
    report["timing"] = [time_batch(kernel, b, args.ctx, splits=splits) for b in batches]
    head = ("batch", "ctx", "paged kernel us", "SDPA contig us", "gather ref us", "kernel GB/s")
    head += ("unroll=1 us", "unroll=4 us", "kernel call us", "SDPA call us")
    print("\n" + "".join(f"{h:>16}" for h in head))
    for r in report["timing"]:
        pk = r.get("paged_kernel_us", float("nan"))
        gb = r.get("paged_kernel_GBps", float("nan"))
        cells = (r["sdpa_contiguous_us"], r["reference_gather_us"], gb)
        cells += tuple(r.get(f"paged_kernel_unroll{u}_us", float("nan")) for u in (1, 4))
        cells += (r.get("paged_kernel_call_us", float("nan")), r["sdpa_contiguous_call_us"])
        print(
            f"{r['batch']:>16}{r['context']:>16}{pk:>16.1f}" + "".join(f"{c:>16.1f}" for c in cells)
        )
        swept = {k: round(v, 1) for k, v in r.items() if k.startswith("paged_kernel_splits")}
        if swept:
            print(" " * 16, swept)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    ok = all(not row["failures"] for row in report["parity"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
