"""Real redis-server processes for tests: each on a free port, in its own temp dir.

Never an in-process fake of Redis: the backend contract is about what a real server does (Lua atomicity, TTLs,
ACLs, timeouts), so every test that talks Redis talks to one of these.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server child process. `stop()`/`start()` keep the port, so clients can reconnect."""

    def __init__(self, *, password: str | None = None, extra_args: tuple[str, ...] = ()) -> None:
        exe = shutil.which("redis-server")
        if exe is None:  # pragma: no cover - .ci/run installs it
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.exe = exe
        self.port = free_port()
        self.password = password
        self.extra_args = extra_args
        self.dir = Path(tempfile.mkdtemp(prefix="xp-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """URL without credentials (as the XP_REDIS_URL contract requires)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        kw: dict[str, object] = {"password": self.password} if self.password else {}
        kw.update(kwargs)
        return redis.Redis.from_url(self.url, **kw)  # type: ignore[arg-type]

    def start(self) -> "RedisServer":
        args = [
            self.exe, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.dir),
            "--enable-debug-command", "local",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        args += list(self.extra_args)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client(socket_connect_timeout=0.2).ping():
                    return self
            except redis.RedisError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} on port {self.port}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not answer within 10 s")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def block_server(server: RedisServer, seconds: float) -> threading.Thread:
    """DEBUG SLEEP from another connection; returns once the server really stopped answering
    (a PING with a 50 ms timeout went unanswered: sequencing, not timing). The thread ends when the
    sleep does, or quietly if the test killed the server meanwhile."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    blocker = server.client()

    def sleep() -> None:
        try:
            blocker.execute_command("DEBUG", "SLEEP", seconds)
        except redis.RedisError:
            pass

    thread = threading.Thread(target=sleep, daemon=True)
    thread.start()
    probe = server.client(socket_timeout=0.05, retry=Retry(NoBackoff(), 0))
    while True:
        try:
            probe.ping()
        except redis.TimeoutError:
            return thread
