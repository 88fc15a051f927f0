"""RedisCore: how a RedisBackend talks to its server — the connection pool, error mapping and
retries, running the library's scripts, raw pipelines, and a worker's own connection.

RedisBackend (redis_backend.py) builds the data operations of the SharedBackend on this; the
pump's RedisPipe and a worker's DirectConnection take their connection settings from it
(`connection_kwargs`).

- Automatic retries (bounded, exponential backoff with jitter) only for operations where repeating is
  harmless: reads, and writes whose repetition leaves the same state. `client` itself never retries.
- After the retries, BackendUnavailable names the URL with any password redacted; `ping()` never
  raises. The pool reconnects by itself once the server is back.
"""
from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import AuthenticationError, NoScriptError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ..errors import BackendError, BackendUnavailable, CredentialsRejected
from . import redis_functions, redis_topology
from . import redis_scripts as scripts
from .config import BackendConfig, is_tls_url, redact_url
from .keys import RedisKeys
from .redis_direct import DirectConnection
from .redis_wire import Packed, join_packed, pack_args, pack_command, pack_commands, pack_head, tls_supported
from .signing import Signer

__all__ = ["RedisCore", "TLS_DEFAULTS"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Backoff before retry k: a random wait of up to 20 ms * 2**k (40, 80, 160 ms ...), never above 0.5 s.
_BACKOFF_BASE = 0.02
_BACKOFF_CAP = 0.5


#: TLS settings of a rediss:// connection, given to the pool explicitly (not left to redis-py's
#: defaults, which changed between releases) so that redis-py's connections and ours
#: (redis_wire.tls_context) verify the server the same way: its certificate against the system's
#: CAs (or SSL_CERT_FILE / SSL_CERT_DIR), and its host name.
TLS_DEFAULTS: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
#: The connection kwargs a raw connection (RedisPipe, DirectConnection) is made from.
_RAW_KWARGS = ("host", "port", "path", "db", "username", "password", "client_name")


def _split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(url without userinfo, username, password) — credentials never stay in the URL we pass on."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None, None
    host = parts.netloc.rpartition("@")[2]
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return clean, user, password


def _ignore(_error: Exception) -> None:
    return None


def _retryable(error: Exception) -> bool:
    # Wrong credentials, or a server certificate that does not verify, do not get better by asking
    # again. redis-py and DirectConnection raise ConnectionError from within the handler of the
    # ssl error, so it is the error's context; the cluster client wraps that once more (no seed
    # node reachable) and the sentinel lookup names it as its context (redis_topology), so the
    # whole chain is looked at.
    return not isinstance(error, AuthenticationError) and not _certificate_rejected(error)


def _certificate_rejected(error: BaseException) -> bool:
    cause: BaseException | None = error
    for _ in range(8):  # the chains above are 2-4 long; the bound only guards against a cycle
        if cause is None:
            return False
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


class RedisCore:
    """The connections of one RedisBackend (one pool per instance, per process). Thread-safe."""

    def __init__(self, config: BackendConfig, signer: Signer) -> None:
        self.config = config
        self.keys = RedisKeys(config.redis_prefix)
        self._prefix = config.redis_prefix
        self._ttl = config.ttl or 0
        self._url = redact_url(config.redis_url)
        url, url_user, url_password = _split_credentials(config.redis_url)
        self._tls = is_tls_url(url)
        self._username = config.redis_username or url_user
        self._password = config.redis_password or url_password
        self._signer = signer
        # The pool's connections never retry on their own (Retry(..., 0)): `client` is handed to the
        # pump for stream commands that are not idempotent (XADD). Our idempotent operations go
        # through self._retry instead.
        # One server, or the master a Sentinel set names (redis_topology.py; a cluster URL gets
        # RedisClusterBackend, see RedisBackend.__new__). TLS: verified against the CA file of
        # backend.redis_ca_cert, else the system trust store.
        self._pool = redis_topology.connection_pool(config, url, self._username, self._password,
                                                    **(TLS_DEFAULTS if self._tls else {}), **config.tls_kwargs())
        # Opt-in durability (backend.redis_wait_replicas): WAIT after every script, on its connection.
        self._wait_tail = (pack_command(b"WAIT", [config.redis_wait_replicas, redis_topology.wait_timeout_ms(config)])
                           if config.redis_wait_replicas else b"")
        #: The redis-py client (no automatic retries). The distributed worker mode builds its stream
        #: keys with `key()` so they stay under this tenant's prefix. decode_responses is off, so every
        #: string in a reply is bytes: the casts to bytes below narrow redis-py's `bytes | str` on that.
        self.client: redis.Redis = redis.Redis(connection_pool=self._pool)
        self._retry = Retry(ExponentialWithJitterBackoff(cap=_BACKOFF_CAP, base=_BACKOFF_BASE),
                            redis_topology.failover_retries(config),
                            supported_errors=(RedisConnectionError, RedisTimeoutError))
        self._ping_retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError, RedisTimeoutError))
        # RESP heads "EVALSHA <sha> <numkeys>" / "EVAL <source> <numkeys>" of each script, packed once,
        # and "FCALL <function> <numkeys>" once the server is known to have our function library
        # (redis_functions.py; `_script_heads` picks). Variadic scripts (nargs < 0) get theirs per call.
        self._heads = redis_functions.ScriptHeads(scripts.ALL, pack_head)
        self._eval_heads = {sc.name: pack_head(b"EVAL", sc.source.encode(), sc.numkeys, sc.nargs)
                            for sc in scripts.ALL if sc.nargs >= 0}
        self._index = self.keys.index()
        self._closed = False

    # -- identity -------------------------------------------------------------------------------
    @property
    def signer(self) -> Signer:
        return self._signer

    @property
    def slot_namespace(self) -> str:
        return self._prefix

    @property
    def url(self) -> str:
        """The server URL with any password redacted."""
        return self._url

    @property
    def prefix(self) -> str:
        """The tenant prefix every key starts with."""
        return self._prefix

    @property
    def ttl(self) -> int:
        """Seconds keys live after their thread's last write; 0 when they never expire."""
        return self._ttl

    # -- running commands -------------------------------------------------------------------------
    def execute(self, fn: Callable[[redis.Redis], T], *, idempotent: bool, what: str = "command") -> T:
        """Run `fn(client)` with this backend's error mapping; retried only if `idempotent`."""
        return self._do(what, lambda: fn(self.client), idempotent)

    def _do(self, what: str, fn: Callable[[], T], retry: bool = True) -> T:
        if self._closed:
            raise BackendUnavailable(f"the redis backend for {self._url} is closed ({what})")
        try:
            if retry:
                return self._retry.call_with_retry(fn, _ignore, _retryable)
            return fn()
        except AuthenticationError as e:
            raise CredentialsRejected(
                f"Redis at {self._url} rejected the credentials of user {self._username or 'default'!r} "
                f"({what}): {self._scrub(e)}") from None
        except (RedisConnectionError, RedisTimeoutError) as e:
            attempts = 1 + (self._retry.get_retries() if retry and _retryable(e) else 0)
            raise BackendUnavailable(
                f"Redis at {self._url} is unavailable: {what} failed after {attempts} attempt(s) "
                f"({type(e).__name__}: {self._scrub(e)})") from None
        except ResponseError as e:
            raise BackendError(f"Redis at {self._url} refused {what}: {self._scrub(e)}") from None
        except RedisError as e:
            raise BackendError(f"Redis at {self._url}: {what} failed: {self._scrub(e)}") from None

    def _scrub(self, error: Exception) -> str:
        text = str(error)
        if self._password:
            text = text.replace(self._password, "***")
        return text

    # -- running our scripts: FCALL of the function library where it is loaded, else EVALSHA/EVAL ------
    @property
    def script_mechanism(self) -> redis_functions.Mechanism | None:
        """"fcall" or "eval" once known (the first script call probes the server), else None."""
        return self._heads.mechanism

    @property
    def _script_heads(self) -> dict[str, bytes]:
        """The packed heads of the fixed-arity scripts for the mechanism in use (probed on first use;
        if the server cannot be reached now, the EVALSHA heads, corrected by _roundtrip later)."""
        if self._heads.mechanism is None:
            try:
                self._detect(None)
            except RedisError:
                pass
        return self._heads.current

    def _detect(self, conn: Any) -> redis_functions.Mechanism:
        """Probe the server (on `conn`, else a pooled connection): FCALL when our function library of
        this exact version is loaded and this user may call it, EVALSHA/EVAL otherwise."""
        def send(*command: Any) -> Any:
            if conn is None:
                return self.client.execute_command(*command)
            conn.send_command(*command)
            return conn.read_response()

        before = self._heads.mechanism
        mechanism = self._heads.probe(send)
        if mechanism != before:
            log.debug("redis backend on %s runs its scripts with %s", self._url,
                      "FCALL" if mechanism == "fcall" else "EVALSHA/EVAL")
        return mechanism

    def run_script(self, script: scripts.LuaScript, keys: tuple[str, ...] | list[str], args: tuple[Any, ...] | list[Any]) -> Any:
        """Run one of the library's scripts (FCALL or EVALSHA/EVAL, as this server allows), once:
        redis-py's errors, no retries and no error mapping (wrap it in `execute` for those)."""
        return self._eval(script, tuple(keys), tuple(args))

    def _eval(self, script: scripts.LuaScript, keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        body = pack_args((*keys, *args))
        head = self._script_heads.get(script.name)  # probes the mechanism on first use
        if head is not None:  # one of the backend's own fixed-arity scripts: its head is packed already
            return self._roundtrip(head, body, script)
        # The pump's and workers' scripts (message_bus), and variadic ones: a head for this call.
        eval_head = pack_head(b"EVAL", script.source.encode(), script.numkeys, len(args))
        return self._roundtrip(self._heads.head(script, len(args)), body, script, eval_head)

    def _roundtrip(self, head: bytes, body: Packed, script: scripts.LuaScript,
                   eval_head: bytes | None = None) -> Any:
        """One FCALL or EVALSHA on a pooled connection (EVAL on NOSCRIPT).

        Our scripts' arguments are packed once into one buffer and sent with one sendall (redis-py's
        generic path encodes argument by argument and records metrics per command; on the append
        hot path that costs more than the script itself). Errors are redis-py's, and a connection
        that failed mid-command is dropped, exactly as the client would do.

        `head` was packed for the mechanism known when the caller built it: if that is unknown or
        has changed, or the server says the mechanism is unavailable (our function library is gone
        after a restart, or this user may not EVAL), the server is probed again on this connection
        and the script sent once more with the right head.
        """
        pool = self._pool
        conn = pool.get_connection()

        wait = self._wait_tail

        def send(*parts: Packed) -> Any:
            """One script (and its WAIT, when configured: both replies are read, so the connection
            stays in step even when the script is refused). A large argument is a piece of its own."""
            packed = join_packed(*parts, wait)
            conn.send_packed_command(packed if type(packed) is list else [packed])
            try:
                return conn.read_response()
            finally:
                if wait:
                    self._check_wait(conn.read_response())

        def run(h: bytes) -> Any:
            try:
                return send(h, body)
            except NoScriptError:
                # Server restarted or SCRIPT FLUSH: EVAL runs the script and caches it again.
                return send(eval_head or self._eval_heads[script.name], body)

        try:
            heads = self._heads
            if heads.mechanism is None or not heads.matches(head):
                self._detect(conn)
                head = heads.rehead(head, script)
            try:
                return run(head)
            except ResponseError as e:
                if not redis_functions.mechanism_error(e):
                    raise
                before = heads.mechanism
                if self._detect(conn) == before == "eval":
                    raise heads.unavailable(e, self._username or "default", self._scrub(e)) from None
                try:
                    return run(heads.rehead(head, script))
                except ResponseError as again:
                    if redis_functions.mechanism_error(again):
                        raise heads.unavailable(again, self._username or "default", self._scrub(again)) from None
                    raise
        except ResponseError:
            raise
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def _check_wait(self, acked: Any) -> None:
        """WAIT's answer: fewer replicas than redis_wait_replicas is a timeout (the write is on the
        master and may be lost in a failover; retried, a repeat of the write is harmless)."""
        if not isinstance(acked, int) or acked < self.config.redis_wait_replicas:
            raise RedisTimeoutError(f"WAIT: {acked} of {self.config.redis_wait_replicas} replica(s) acknowledged "
                                    f"the write within {redis_topology.wait_timeout_ms(self.config)} ms")

    def _pipeline(self, packed: Packed, count: int, *, best_effort_tail: int = 0) -> list[Any]:
        """Send already packed commands in one write and read their `count` replies; a command's
        error reply is returned in its place (every reply is read, so the connection stays in step).
        Connection errors are raised, and that connection dropped, as in _roundtrip."""
        direct = self._direct
        if direct is not None and self._direct_owner == threading.get_ident():
            return direct.pipeline(packed, count, best_effort_tail=best_effort_tail)
        pool = self._pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(packed if type(packed) is list else [packed])
            out: list[Any] = []
            for i in range(count):
                try:
                    out.append(conn.read_response())
                except ResponseError as e:
                    out.append(e)
                except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                    if i < count - best_effort_tail:
                        raise
                    conn.disconnect()
                    out.extend([e] * (count - i))
                    break
            return out
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def send_commands(self, commands: list[tuple[Any, ...]], *, best_effort_tail: int = 0) -> list[Any]:
        """Send `commands` (each a tuple of str / bytes / int arguments) in one write on one pooled
        connection and read every reply: a raw pipeline without redis-py's per-command encoding
        and response callbacks (replies are as Redis sends them: bytes, ints, nested lists).
        A command's error reply is returned in its place; connection errors are raised as redis-py
        raises them (no retry, no mapping: for callers that handle those themselves), except while
        reading the last `best_effort_tail` replies: then the error takes those replies' places
        (the connection is dropped) and the replies read before it are returned."""
        return self._pipeline(pack_commands(commands), len(commands), best_effort_tail=best_effort_tail)

    # -- Lifecycle --------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def ping(self) -> bool:
        """True if the server answers PING; False (never an exception) otherwise."""
        if self._closed:
            return False
        try:
            return bool(self._ping_retry.call_with_retry(self.client.ping, _ignore))
        except Exception:  # noqa: BLE001 - ping reports health, it must not raise
            return False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.disconnect()
            if self._direct is not None:
                self._direct.disconnect()

    def __enter__(self) -> "RedisCore":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- What the pump's RedisPipe and a worker's DirectConnection need -------------------------------
    def pipe_capable(self) -> bool:
        """True when RedisPipe and DirectConnection can talk to this server: plain TCP, a unix socket
        or TLS (unless the pool's TLS settings ask for OCSP checks, which only redis-py makes)."""
        # Sentinel: RedisPipe and DirectConnection ask connection_kwargs() for the current master on
        # every (re)connection. WAIT (redis_wait_replicas) is sent by the pooled path only.
        if self._wait_tail:
            return False
        return not self._closed and (not self._tls or tls_supported(self._pool.connection_kwargs))

    def connection_kwargs(self) -> dict[str, Any]:
        """host/port or path, db, username, password and client_name of this backend's connections
        (on Sentinel: of the current master, None when no sentinel answers), `tls` (True for
        rediss://) and, over TLS, the pool's ssl_* settings."""
        return self._connection_kwargs(strict=False)

    def _reconnect_kwargs(self) -> dict[str, Any]:
        """connection_kwargs() for a DirectConnection that reconnects on Sentinel: a lookup that
        failed because no sentinel's certificate verifies raises that error, so the operation fails
        at once (_retryable) instead of being retried as "no sentinel named the master"."""
        return self._connection_kwargs(strict=True)

    def _connection_kwargs(self, *, strict: bool) -> dict[str, Any]:
        kw = self._pool.connection_kwargs
        out = {k: kw.get(k) for k in _RAW_KWARGS}
        if self.config.redis_mode == "sentinel":
            # The master the sentinels name now (a round trip to them): a raw connection asks
            # again each time it connects, so after a failover it follows, as the pool does.
            try:
                out["host"], out["port"] = self._pool.get_master_address()  # type: ignore[attr-defined]
            except RedisError as e:  # no sentinel answers now: a raw connection asks again when it connects
                if strict and _certificate_rejected(e):
                    raise
                out["host"] = out["port"] = None
        out["tls"] = self._tls
        if self._tls:
            out.update((k, v) for k, v in kw.items() if k.startswith("ssl_"))
        return out

    def scrub(self, error: object) -> str:
        """`error` as text with this backend's password (if any) blanked."""
        return self._scrub(error if isinstance(error, Exception) else Exception(str(error)))

    @staticmethod
    def pack_commands(commands: list[tuple[Any, ...]]) -> bytes:
        """Commands (tuples of str / bytes / int) in RESP, as send_commands packs them."""
        return pack_commands(commands)

    # -- A worker's own connection ------------------------------------------------------------------
    _direct: DirectConnection | None = None
    _direct_owner = 0

    def use_direct_connection(self) -> None:
        """Send the calling thread's batched commands (temp_get_many, temp_put_many, temp_take,
        buffer_append_at, send_commands) through one connection of its own instead of the pool:
        for a worker process's single task loop. Other threads keep using the pool. Same commands,
        same errors, same retries (see redis_direct.py). No-op where pipe_capable() is False."""
        direct = self.new_direct_connection()
        if direct is not None:
            self._direct = direct
            self._direct_owner = threading.get_ident()

    def new_direct_connection(self) -> DirectConnection | None:
        """A DirectConnection to this backend's server for one thread's own use (None where
        pipe_capable() is False)."""
        if not self.pipe_capable():
            return None
        cfg = self.config
        follow = self._reconnect_kwargs if self.config.redis_mode == "sentinel" else None
        return DirectConnection(self.connection_kwargs(), socket_timeout=cfg.socket_timeout,
                                connect_timeout=cfg.connect_timeout, refresh=follow)


