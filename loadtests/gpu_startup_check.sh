#!/usr/bin/env bash
# Does `candlewick serve` start and stop cleanly on an NVIDIA GPU (MLX's CUDA backend)?
#
# Run from the repository root on the GPU machine, with MLX (CUDA) importable:
#     OUT=/tmp/out bash loadtests/gpu_startup_check.sh
# It writes a Llama-3-8B-shaped folder of random bf16 weights (loadtests/make_model.py, in the
# background while the small cases run), then runs loadtests/startup_check.py twice: the failure
# cases and a plain serve on a tiny model, and a plain serve (no memory flags) of the 8B folder
# that must answer a chat completion and exit 0 on SIGTERM, plus a SIGINT while it loads.
# Reports land in $OUT (new_tiny.json, new_8b.json) and the whole console in $OUT/log.txt.
#
# With BASE=<another checkout> it first runs that checkout's server the same way (an older
# version, to see how it failed: exit status, output, Python stacks from faulthandler) and, if
# that aborts, once more under cuda-gdb for the native stacks ($OUT/gdb.txt).
set -u
OUT=${OUT:-/tmp/gpu-startup}
BIG=${BIG:-/tmp/llama3-8b-random}
TINY=${TINY:-/tmp/tiny-random}
BUDGET_S=${BUDGET_S:-380}  # stop starting optional steps past this many seconds
here=$(pwd)
py=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
left() { [ "$SECONDS" -lt "$BUDGET_S" ]; }

nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
"$py" -c 'import json, mlx.core as mx; print(json.dumps({"mlx": mx.__version__,
  "device": str(mx.default_device()), "device_info": mx.device_info(),
  "memory_limit": mx.get_memory_limit()}))'
"$py" -m loadtests.make_model --preset tiny --out "$TINY" > /dev/null 2>&1
if [ ! -f "$BIG/config.json" ]; then
  "$py" -m loadtests.make_model --preset llama3-8b --out "$BIG" > "$OUT/make_model.txt" 2>&1 &
  maker=$!
fi

if [ -n "${BASE:-}" ]; then
  echo "== $BASE: plain serve of the tiny model (no memory flags), then SIGTERM"
  (cd "$BASE" && timeout 90 "$py" "$here/loadtests/startup_check.py" --model "$TINY" \
    --cases serve_sigterm --load-timeout 60 --out "$OUT/old_plain.json")
  echo "== $BASE: serve with --kv-cache-memory 1GiB, then SIGTERM"
  (cd "$BASE" && timeout 90 "$py" "$here/loadtests/startup_check.py" --model "$TINY" \
    --cases serve_sigterm --serve-args "--kv-cache-memory 1GiB" --load-timeout 60 \
    --out "$OUT/old_sigterm.json")
fi

echo "== this checkout: failure cases and a plain serve, tiny model"
timeout 300 "$py" -m loadtests.startup_check --model "$TINY" --load-timeout 60 \
  --cases kv_too_small,missing_model,port_in_use,serve_sigterm --out "$OUT/new_tiny.json"

if [ -n "${maker:-}" ]; then
  echo "== waiting for the 8B folder (${SECONDS}s so far)"
  wait "$maker" || { echo "make_model failed"; tail "$OUT/make_model.txt"; }
  echo "8B folder ready at ${SECONDS}s"
fi
echo "== this checkout: plain serve (no memory flags) of the 8B folder, SIGTERM; SIGINT while loading"
timeout 420 "$py" -m loadtests.startup_check --model "$BIG" --load-timeout 300 \
  --cases serve_sigterm,sigint_while_loading --out "$OUT/new_8b.json"

if [ -n "${BASE:-}" ] && left && grep -q '"rc": -6' "$OUT"/old_*.json 2>/dev/null; then
  echo "== $BASE under cuda-gdb: the aborting start, native stacks"
  port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  (cd "$BASE" && timeout 120 cuda-gdb -q -batch -ex "set pagination off" \
    -ex "set print thread-events off" -ex run -ex "info threads" -ex "thread apply all bt 30" \
    --args "$py" -m server.cli serve --model "$TINY" --port "$port" \
    --data-dir "$(mktemp -d)") > "$OUT/gdb.txt" 2>&1
  grep -n "SIGABRT\|terminate\|#[0-9]* .* in " "$OUT/gdb.txt" | head -80
fi
echo "done in ${SECONDS}s"
