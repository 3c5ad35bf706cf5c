"""Serving one model sharded over several ranks (see engine.parallel).

``candlewick serve --tensor-parallel N`` on one machine starts N rank processes on MLX's launch
protocol (``MLX_RANK``, and a ring hostfile of loopback ports in ``MLX_HOSTFILE``). Across
machines, ``mlx.launch`` starts ``candlewick serve`` on every host instead (the environment
names the rank); each then starts its one rank process the same way.

The process the user started stays a supervisor, without MLX state of its own: it bounds the
ranks' connection (MLX's ring backend would wait forever, holding the interpreter), forwards
SIGTERM and SIGINT to rank 0, and exits with rank 0's status. Rank 0 serves HTTP and sends the
others its settings; each rank loads the model and keeps its shard.

Faults: ranks that do not connect within ``--tensor-parallel-timeout`` fail the start-up with one
line naming their addresses. Once serving, a rank that fails or stops answering turns ``/health``
to 503, fails the requests in flight, and rank 0 exits with status 1 two seconds later; the
supervisor then ends every rank and exits 1.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time

import mlx.core as mx

from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.engine_thread import release_thread_state
from engine.models.base import CausalLM
from engine.parallel.group import (
    RankError,
    addresses,
    broadcast,
    init_group,
    launch_local,
    launched,
    local_hostfile,
)
from engine.parallel.lockstep import LeaderCore, follow, sharded_core
from engine.structured.grammar import accept_constraints
from server.settings import ServerSettings

log = logging.getLogger(__name__)

FAULT_GRACE = 2.0  # seconds /health says 503 before a faulty rank 0 exits
_SETTINGS = "CANDLEWICK_RANK_SETTINGS"  # a rank process: the file holding its settings
_READY_FD = "CANDLEWICK_RANK_READY_FD"  # a rank process: where it says it has connected


class Parallel:
    """Rank 0's side of the group, as the server state uses it."""

    def __init__(self, group, settings: ServerSettings):
        self.group, self.settings = group, settings
        self.leader: LeaderCore | None = None

    @property
    def size(self) -> int:
        return self.group.size()

    @property
    def fault(self) -> str | None:
        return self.leader.fault if self.leader is not None else None

    def make_core(self, model: CausalLM, config: EngineConfig, dtype: mx.Dtype) -> LeaderCore:
        try:
            core = sharded_core(model, config, dtype, self.group)
        except RuntimeError as e:  # a follower that could not load the model has exited
            raise RankError(f"the other ranks did not start their engines: {e}") from e
        self.leader = LeaderCore(
            core, self.group, timeout=self.settings.tensor_parallel_timeout, on_fault=_exit_soon
        )
        return self.leader

    def ranks(self) -> list[dict]:
        if self.leader is None:
            return [{"rank": r, "status": "loading"} for r in range(self.size)]
        return self.leader.ranks()

    def stop(self) -> None:
        """After the engine thread has stopped: release the followers."""
        if self.leader is not None:
            self.leader.stop()


def _exit_soon(message: str) -> None:
    """Rank 0's fault: exit non-zero shortly, whatever the engine thread is stuck in."""

    def exit_later() -> None:
        time.sleep(FAULT_GRACE)
        print(f"candlewick: error: tensor parallel: {message}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(1)

    threading.Thread(target=exit_later, name="candlewick-rank-fault", daemon=True).start()


def serve_parallel(settings: ServerSettings) -> int:
    """In a rank process: join the group, then serve (rank 0) or follow. Otherwise: start the
    rank processes and supervise them. The exit status."""
    if _SETTINGS in os.environ:
        return run_rank(settings)
    from server.serve import StartupError, check_model, fail

    try:
        check_model(settings.model)  # before any rank starts
    except StartupError as e:
        return fail(str(e))
    return Supervisor(settings).run()


class Supervisor:
    """Starts this machine's ranks, bounds their connection, and follows them to the end."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.procs: list[subprocess.Popen] = []

    def run(self) -> int:
        from server.serve import fail

        s = self.settings
        fd, path = tempfile.mkstemp(prefix="candlewick-settings-")
        with os.fdopen(fd, "wb") as f:
            pickle.dump(s, f)
        env = {**os.environ, _SETTINGS: path}
        command = [sys.executable, "-m", "server.tensor_parallel"]
        if launched():  # by mlx.launch: this host's one rank
            ranks, hostfile = [int(os.environ["MLX_RANK"])], None
        else:
            ranks, hostfile = list(range(s.tensor_parallel)), local_hostfile(s.tensor_parallel)
        ready = []
        for rank in ranks:
            r, w = os.pipe()
            proc_env = {**env, _READY_FD: str(w)}
            # Their own session: a terminal's Ctrl-C or a kill of this group reaches the ranks
            # only through this process (rank 0 drains, then stops the others).
            popen = dict(env=proc_env, pass_fds=(w,), start_new_session=True)
            if hostfile is None:
                self.procs.append(subprocess.Popen(command, **popen))
            else:
                self.procs += launch_local(command, [rank], hostfile, **popen)
            os.close(w)
            ready.append(r)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._forward)
        try:
            if not self._connected(ready, s.tensor_parallel_timeout):
                self._end_all(0)
                if any(p.returncode not in (0, -signal.SIGKILL) for p in self.procs):
                    return 1  # a rank said why
                if hostfile is not None:
                    os.environ["MLX_HOSTFILE"] = hostfile
                return fail(
                    f"the ranks could not connect within {s.tensor_parallel_timeout:g}s "
                    f"({addresses()}): are they all started, and can they reach each other?"
                )
            return self._wait()
        finally:
            os.unlink(path)
            if hostfile is not None:
                os.unlink(hostfile)

    def _connected(self, pipes: list[int], timeout: float) -> bool:
        """Whether every rank said it joined the group within ``timeout``."""
        deadline = time.monotonic() + timeout
        waiting = set(pipes)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0 or any(p.poll() is not None for p in self.procs):
                return False
            readable, _, _ = select.select(list(waiting), [], [], min(left, 0.2))
            for r in readable:
                os.read(r, 1)
                os.close(r)
                waiting.discard(r)
        return True

    def _wait(self) -> int:
        """Until the first rank here exits; then the rest get a bounded while to follow."""
        lead = self.procs[0]
        while all(p.poll() is None for p in self.procs):
            time.sleep(0.1)
        if lead.poll() is None:  # another rank failed: rank 0 notices, reports and exits
            grace = self.settings.tensor_parallel_timeout + FAULT_GRACE + 1
        else:  # rank 0 ended: after a clean stop the rest follow at once; else nobody waits
            grace = 10.0 if lead.returncode == 0 else 0.0
        self._end_all(grace)
        failed = [p.returncode for p in self.procs if p.returncode != 0]
        return 0 if not failed and lead.returncode == 0 else 1

    def _end_all(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def _forward(self, sig: int, _frame) -> None:
        """SIGTERM, SIGINT: for the rank serving HTTP here (it drains, then stops the rest)."""
        if self.procs and self.procs[0].poll() is None:
            self.procs[0].send_signal(sig)


def run_rank(settings: ServerSettings) -> int:
    """One rank: join the group (the supervisor bounds the wait), then serve or follow."""
    from server.serve import fail, serve

    try:
        group = init_group()
    except RankError as e:
        return fail(str(e))
    with os.fdopen(int(os.environ.pop(_READY_FD)), "wb") as ready:
        ready.write(b"1")
    _exit_with_supervisor()
    if group.rank() != 0:
        for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 stops the group
            signal.signal(sig, signal.SIG_IGN)
        return run_follower(group)
    if settings.tensor_parallel > 1 and group.size() != settings.tensor_parallel:
        return fail(f"--tensor-parallel {settings.tensor_parallel}, but {group.size()} ranks")
    broadcast(group, settings)
    log.info("rank 0 of %d: serving HTTP", group.size())
    parallel = Parallel(group, settings)
    try:
        return serve(settings, parallel)
    finally:
        parallel.stop()


def _exit_with_supervisor() -> None:
    """A rank whose supervisor is gone (killed) ends too."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        print("candlewick: error: the supervising process is gone", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="candlewick-rank-parent", daemon=True).start()


def run_follower(group) -> int:
    """A follower rank: rank 0's settings, the same model, its shard, then rank 0's steps."""
    from engine.loader.build import LoadedModel
    from engine.loader.load import load_model

    rank = group.rank()
    try:
        settings: ServerSettings = broadcast(group)
        loaded = load_model(
            settings.model,
            quantize=settings.quantize_spec,
            cpu_weights=settings.cpu_weights,
            kv_cache_memory=settings.kv_cache_memory,
        )
        if not isinstance(loaded, LoadedModel):
            raise RankError(f"{loaded.name} is not a generative model")
        accept_constraints(loaded.tokenizer.backend.to_str())  # structured output
        core: EngineCore = sharded_core(loaded.model, None, loaded.dtype, group)
        follow(core, group, _exit_hung, settings.tensor_parallel_timeout)
    except Exception as e:
        print(f"candlewick: error: rank {rank}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        release_thread_state()
    return 0


def _exit_hung(message: str) -> None:
    print(f"candlewick: error: rank 0 is silent: {message}", file=sys.stderr, flush=True)
    os._exit(1)


def main() -> int:
    """A rank process (started by the supervisor)."""
    with open(os.environ[_SETTINGS], "rb") as f:
        settings = pickle.load(f)
    from server.serve import serve

    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
