"""The ranks of a tensor-parallel server: starting them on one machine, joining their group,
and the few host-side exchanges they need (everything goes through ``mx.distributed``).

Ranks find each other the way ``mlx.launch`` tells them to (MLX's launch protocol): each process
gets ``MLX_RANK`` and, for the ring backend, ``MLX_HOSTFILE``, a JSON file listing every rank's
``ip:port``. ``launch_local`` does exactly that for N ranks on loopback; ``mlx.launch`` does it
across machines (and for MPI, NCCL or JACCL).
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import tempfile
from collections.abc import Sequence

import mlx.core as mx
import numpy as np


class RankError(RuntimeError):
    """The ranks cannot connect, or a rank failed or stopped answering."""


def launched() -> bool:
    """Whether this process is one rank of a launched group (``mlx.launch`` or ours)."""
    return "MLX_RANK" in os.environ


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def local_hostfile(n: int) -> str:
    """A ring hostfile for ``n`` ranks on loopback (free ports), written to a temporary file."""
    hosts = [[f"127.0.0.1:{port}"] for port in free_ports(n)]
    fd, path = tempfile.mkstemp(prefix="candlewick-ranks-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(hosts, f)
    return path


def rank_env(rank: int, hostfile: str) -> dict[str, str]:
    return {"MLX_RANK": str(rank), "MLX_HOSTFILE": hostfile}


def launch_local(
    command: Sequence[str], ranks: Sequence[int], hostfile: str, **popen
) -> list[subprocess.Popen]:
    """Start ``command`` once for each of ``ranks`` (on the loopback hostfile)."""
    env = popen.pop("env", os.environ)
    return [
        subprocess.Popen(list(command), env={**env, **rank_env(r, hostfile)}, **popen)
        for r in ranks
    ]


def init_group(backend: str = "any"):
    """Join the group this process was launched into. MLX's ring backend waits for its peers
    for as long as it takes, holding the interpreter meanwhile: whoever starts the ranks
    bounds that wait from outside (see server.tensor_parallel)."""
    try:
        return mx.distributed.init(strict=True, backend=backend)
    except Exception as e:
        raise RankError(f"the ranks cannot connect: {e}") from e


def addresses() -> str:
    """The ranks' addresses as ``MLX_HOSTFILE`` lists them, for messages."""
    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return "no MLX_HOSTFILE"
    try:
        with open(path) as f:
            return "ranks at " + ", ".join(",".join(h) for h in json.load(f))
    except (OSError, ValueError):
        return f"hostfile {path}"


def broadcast(group, value=None):
    """Rank 0's ``value`` (any picklable object) on every rank: its size, then its bytes,
    each summed with zeros from the other ranks."""
    payload = pickle.dumps(value) if group.rank() == 0 else b""
    size = mx.distributed.all_sum(mx.array([len(payload)], dtype=mx.int32), group=group)
    n = int(size.item())
    data = np.zeros(n, dtype=np.uint8)
    if group.rank() == 0:
        data[:] = np.frombuffer(payload, dtype=np.uint8)
    summed = mx.distributed.all_sum(mx.array(data), group=group)
    mx.eval(summed)  # on every rank, rank 0 included: each collective must run everywhere
    return value if group.rank() == 0 else pickle.loads(np.array(summed).tobytes())


def gather_ints(group, value: int) -> list[int]:
    """Every rank's ``value``, in rank order."""
    row = np.zeros(group.size(), dtype=np.int64)
    row[group.rank()] = value
    summed = mx.distributed.all_sum(mx.array(row.astype(np.int32)), group=group)
    return [int(v) for v in np.array(summed)]
