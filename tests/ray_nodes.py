"""Real Ray nodes for tests: `ray start --block` each in a session of its own, stopped by killing exactly that
session's processes (never `ray stop`, which ends every Ray process on the machine, other people's too)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def free_ports(n: int) -> list[int]:
    import socket
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_env(home: Path, **extra) -> dict:
    """This environment without any Ray auth setting of the caller's, HOME `home`, the venv first on PATH (a job's
    `python` is the one on the PATH of `ray start`, as cluster.yaml sets it)."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    return env | {"HOME": str(home), "PATH": f"{BIN}:{env.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0"} | extra


def session_pids(sid: int) -> list[int]:
    """Processes of session `sid` (a node's raylet starts its workers in their own process groups, same session)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:
                pids.append(int(d.name))
    return pids


class Node:
    """One `ray start --block` in its own session (its pid is the session id); `stop` ends exactly its processes."""

    def __init__(self, name: str, args: list[str], env: dict, logs: Path, wrap=None):
        """wrap: a function from the `ray start` argv to the argv to run (e.g. inside `unshare`)."""
        self.name, self.log = name, logs / f"{name}.log"
        argv = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *map(str, args)]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(wrap(argv) if wrap else argv, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self, n: int = 3000) -> str:
        return f"--- {self.name} ({self.log}):\n" + self.log.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        sid = self.proc.pid
        try:
            os.killpg(sid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for pid in session_pids(sid):  # whatever is left, workers included
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)


def wait_for(what: str, ready, nodes: list[Node], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [n for n in nodes if n.proc.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"exited with {dead[0].proc.returncode}" if dead else f"not within {timeout:g} s"
            pytest.fail(f"{what}: {why}\n" + "\n".join(n.tail() for n in nodes))
        time.sleep(0.5)


