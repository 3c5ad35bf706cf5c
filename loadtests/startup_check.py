"""Start and stop `candlewick serve` the ways an operator does, and report how each one ended.

Each case is a real process of `python -m server.cli serve` on a loopback port: a start that must
fail (exit 1, one `candlewick: error:` line, no abort), a plain serve that must answer a chat
completion and then exit 0 on SIGTERM, and a SIGINT while the model is still loading that must
exit at once. Every wait has a deadline. The report (JSON) holds the device's `mx.device_info()`,
MLX's memory readings, the KV budget the server chose and each case's exit status, time and
output tail; it prints a line per case too.

    python -m loadtests.startup_check --model /tmp/llama3-8b-random --out $OUT/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ABORT_MARKS = ("terminate called", "Aborted", "Fatal Python error", "Traceback")


def device_report() -> dict[str, Any]:
    """What MLX says about the default device, read in a child process (this one keeps no
    device context, so the servers' readings of free memory are not ours)."""
    code = (
        "import json, mlx.core as mx; print(json.dumps({'mlx': mx.__version__, "
        "'default_device': str(mx.default_device()), 'device_info': mx.device_info(), "
        "'memory_limit': mx.get_memory_limit(), 'active_memory': mx.get_active_memory(), "
        "'cache_memory': mx.get_cache_memory()}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-2000:]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_argv(model: str, port: int, *extra: str) -> list[str]:
    data = tempfile.mkdtemp(prefix="cw-data-")
    return [sys.executable, "-m", "server.cli", "serve", "--model", model, "--port", str(port),
            "--data-dir", data, *extra]  # fmt: skip


def ended(proc: subprocess.Popen, started: float, timeout: float) -> dict[str, Any]:
    """Waits for the process (killing it past ``timeout``) and describes how it ended."""
    try:
        out, _ = proc.communicate(timeout=timeout)
        hung = False
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        hung = True
    lines = out.splitlines()
    return {
        "rc": proc.returncode,
        "hung": hung,
        "seconds": round(time.monotonic() - started, 2),
        "error_lines": [x for x in lines if x.startswith("candlewick: error:")],
        "aborted": [m for m in ABORT_MARKS if m in out],
        "kv_line": next((x for x in lines if "engine.memory: KV cache" in x), None),
        "tail": lines[-25:],
    }


def fails_to_start(argv: list[str], timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = ended(proc, started, timeout)
    last = result["tail"][-1] if result["tail"] else ""
    result["ok"] = (
        result["rc"] == 1
        and not result["aborted"]
        and len(result["error_lines"]) == 1
        and last.startswith("candlewick: error:")
    )
    return result


def serves_then_stops(
    argv: list[str], port: int, model_id: str | None, load_timeout: float, sig: int
) -> dict[str, Any]:
    """Start; once /health is 200 ask one chat completion; then send ``sig``."""
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: dict[str, Any] = {}
    try:
        deadline = started + load_timeout
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    found["healthy_after_s"] = round(time.monotonic() - started, 2)
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        if "healthy_after_s" in found:
            model = model_id or httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            body = {"model": model, "messages": [{"role": "user", "content": "Hello!"}],
                    "max_tokens": 16, "temperature": 0}  # fmt: skip
            t0 = time.monotonic()
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
            found["chat_status"] = r.status_code
            found["chat_seconds"] = round(time.monotonic() - t0, 2)
            found["chat_usage"] = r.json().get("usage") if r.status_code == 200 else r.text[:300]
    finally:
        stop_sent = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(sig)
        result = ended(proc, started, timeout=120)
    result |= found
    result["stop_seconds"] = round(time.monotonic() - stop_sent, 2)
    want = 130 if sig == signal.SIGINT else 0
    result["ok"] = (
        result.get("chat_status") == 200
        and result["rc"] == want
        and not result["aborted"]
        and not result["hung"]
    )
    return result


def interrupted_while_loading(argv: list[str], after: float) -> dict[str, Any]:
    """SIGINT ``after`` seconds into the start (the model still loading): it must exit at once."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(after)
    loading = proc.poll() is None
    sent = time.monotonic()
    if loading:
        proc.send_signal(signal.SIGINT)
    result = ended(proc, started, timeout=60)
    result["signal_to_exit_s"] = round(time.monotonic() - sent, 2)
    result["ok"] = loading and result["rc"] == 130 and not result["aborted"]
    result["ok"] = result["ok"] and result["signal_to_exit_s"] < 10
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True, help="a model folder served with no memory flags")
    ap.add_argument("--tiny", help="a small model folder for the failure cases (default: --model)")
    ap.add_argument("--out", type=Path, required=True, help="the JSON report")
    ap.add_argument("--load-timeout", type=float, default=420.0)
    ap.add_argument("--serve-args", default="", help="more serve flags for serve_sigterm")
    ap.add_argument("--cases", default="kv_too_small,missing_model,port_in_use,serve_sigterm,"
                    "sigint_while_loading")  # fmt: skip
    args = ap.parse_args(argv)
    tiny = args.tiny or args.model
    report: dict[str, Any] = {"device": device_report(), "cases": {}}
    cases = args.cases.split(",")

    def record(name: str, result: dict[str, Any]) -> None:
        report["cases"][name] = result
        args.out.write_text(json.dumps(report, indent=1, default=str))
        print(f"{name}: ok={result['ok']} rc={result['rc']} {result['seconds']}s "
              f"{result['error_lines'] or ''}{result['aborted'] or ''}", flush=True)  # fmt: skip

    if "kv_too_small" in cases:
        argv_ = serve_argv(tiny, free_port(), "--kv-cache-memory", "64KiB")
        record("kv_too_small", fails_to_start(argv_, args.load_timeout))
    if "missing_model" in cases:
        record("missing_model", fails_to_start(serve_argv("/nonexistent/model", free_port()), 60))
    if "port_in_use" in cases:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            record("port_in_use", fails_to_start(serve_argv(tiny, port), 60))
    if "serve_sigterm" in cases:
        port = free_port()
        result = serves_then_stops(
            serve_argv(args.model, port, *args.serve_args.split()),
            port,
            None,
            args.load_timeout,
            signal.SIGTERM,
        )
        record("serve_sigterm", result)
    if "sigint_while_loading" in cases:
        argv_ = serve_argv(args.model, free_port())
        record("sigint_while_loading", interrupted_while_loading(argv_, 4.0))
    failed = [n for n, r in report["cases"].items() if not r["ok"]]
    print("all ok" if not failed else f"failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
