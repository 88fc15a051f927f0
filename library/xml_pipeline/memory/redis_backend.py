"""RedisBackend: the SharedBackend on a Redis server (distributed deployments, pods).

What it guarantees, and why (docs/storage.md has the full story):
- Every multi-key write is one Lua script (redis_scripts.py): the append assigns the index, checks
  max_slots, records its append_id and refreshes the TTL of the thread's buffer and registry keys in
  one atomic step and one round trip (EVALSHA, EVAL on NOSCRIPT).
- Automatic retries (bounded, exponential backoff with jitter) only for operations where repeating is
  harmless: reads, and writes whose repetition leaves the same state. An append is made harmless by
  its append_id (generated per call when not given), so a retry after a timeout that hid a success
  returns the first index instead of storing the slot twice. `client` itself never retries.
- After the retries, BackendUnavailable names the URL with any password redacted; `ping()` never
  raises. The pool reconnects by itself once the server is back.
- Listing and clearing walk the prefix's index SET (`meta:index`, kept by the scripts) with SSCAN;
  never KEYS, and not SCAN either: Redis ACLs cannot confine SCAN to a prefix, so a tenant's user
  is not granted it. `reindex()` (SCAN, for an admin) rebuilds the index from the keys.
"""
from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar, cast
from urllib.parse import unquote, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import AuthenticationError, NoScriptError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ..errors import AppendIdConflict, BackendError, BackendUnavailable, ThreadFullError
from .. import contract
from . import redis_functions, redis_topology
from . import redis_scripts as scripts
from .config import BackendConfig, compat_config, redact_url
from .keys import RedisKeys, check_tagged_id
from .redis_pipe import DirectConnection
from .protocol import Appended
from .serialization import default_signer
from .signing import Signer

__all__ = ["RedisBackend", "UnsignedBackendWarning", "DEFAULT_TEMP_TTL"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: TTL of temporary keys (and the dedup window of appends) when the config sets no TTL.
DEFAULT_TEMP_TTL = 86400
#: SSCAN / SCAN COUNT hint: entries examined per round trip while listing, counting or clearing.
SCAN_COUNT = 1000
#: info() stops counting after this many keys per key space (and says so with counts_capped).
INFO_COUNT_LIMIT = 100_000
_BATCH = 500

# Backoff before retry k: a random wait of up to 20 ms * 2**k (40, 80, 160 ms ...), never above 0.5 s.
_BACKOFF_BASE = 0.02
_BACKOFF_CAP = 0.5


class UnsignedBackendWarning(UserWarning):
    """A Redis backend runs without a configured signing key (its slots are readable by this process
    and its children only)."""


_warned_prefixes: set[str] = set()
_warn_lock = threading.Lock()


def _signer_for(config: BackendConfig) -> Signer:
    signer = config.signer() or default_signer()
    if not signer.local:
        return signer
    with _warn_lock:
        first = config.redis_prefix not in _warned_prefixes
        _warned_prefixes.add(config.redis_prefix)
    if first:
        msg = (f"Redis backend (prefix {config.redis_prefix!r}) has no signing key: set XP_SIGNING_KEY "
               "or backend.signing_key. Until then slots are signed with a random key private to this "
               "process (and the worker processes it starts): no other process can read them.")
        log.warning(msg)
        warnings.warn(msg, UnsignedBackendWarning, stacklevel=3)
    return signer


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


def _pack_head(command: bytes, script: bytes, numkeys: int, nargs: int) -> bytes:
    count = 3 + numkeys + nargs
    nk = str(numkeys).encode()
    return b"*%d\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
        count, len(command), command, len(script), script, len(nk), nk)


def _pack_args(args: Iterable[Any]) -> bytes:
    """RESP bulk strings for str / bytes / int arguments (the only types our scripts take)."""
    out = []
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = b"%d" % a
        elif not isinstance(a, bytes):
            a = bytes(a)
        out.append(b"$%d\r\n%b\r\n" % (len(a), a))
    return b"".join(out)


def _pack_command(command: bytes, args: list[Any]) -> bytes:
    return b"*%d\r\n$%d\r\n%b\r\n" % (len(args) + 1, len(command), command) + _pack_args(args)


def _ignore(_error: Exception) -> None:
    return None


def _retryable(error: Exception) -> bool:
    # Wrong credentials do not get better by asking again.
    return not isinstance(error, AuthenticationError)


class RedisBackend:
    """SharedBackend on Redis. Thread-safe; one connection pool per instance (per process)."""

    is_shared = True

    def __new__(cls, config: BackendConfig | str | None = None, **kwargs: Any) -> "RedisBackend":
        # A redis+cluster:// URL gets the cluster backend, whichever constructor was called.
        url = kwargs.get("url") or (config.redis_url if isinstance(config, BackendConfig) else config)
        if cls is RedisBackend and isinstance(url, str) and contract.redis_mode(url) == "cluster":
            from .redis_cluster import RedisClusterBackend
            return super().__new__(RedisClusterBackend)
        return super().__new__(cls)

    def __init__(self, config: BackendConfig | str | None = None, *, url: str | None = None,
                 prefix: str | None = None, ttl: int | None = None, signer: Signer | None = None) -> None:
        """A backend on the Redis server of `config`, or of xml-pipeline's arguments:
        `RedisBackend(url="redis://host:6379", prefix="xp:", ttl=86400)` (`url` may also come first,
        by position; `ttl=0` keeps keys forever). Arguments given override the config's fields.
        `signer` overrides the key ring (a child process gets its parent's process-local key this
        way when no key is configured, see __reduce__)."""
        config = compat_config(config, "redis", redis_url=url, redis_prefix=prefix, redis_ttl=ttl)
        self.config = config
        self.keys = RedisKeys(config.redis_prefix)
        self._prefix = config.redis_prefix
        self._ttl = config.ttl or 0
        self._url = redact_url(config.redis_url)
        url, url_user, url_password = _split_credentials(config.redis_url)
        self._username = config.redis_username or url_user
        self._password = config.redis_password or url_password
        self._signer = signer if signer is not None else _signer_for(config)
        # The pool's connections never retry on their own (Retry(..., 0)): `client` is handed to the
        # pump for stream commands that are not idempotent (XADD). Our idempotent operations go
        # through self._retry instead.
        # One server, or the master a Sentinel set names (redis_topology.py; a cluster URL gets
        # RedisClusterBackend, see __new__).
        self._pool = redis_topology.connection_pool(config, url, self._username, self._password)
        # Opt-in durability (backend.redis_wait_replicas): WAIT after every script, on its connection.
        self._wait_tail = (_pack_command(b"WAIT", [config.redis_wait_replicas, redis_topology.wait_timeout_ms(config)])
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
        self._heads = redis_functions.ScriptHeads(scripts.ALL, _pack_head)
        self._eval_heads = {sc.name: _pack_head(b"EVAL", sc.source.encode(), sc.numkeys, sc.nargs)
                            for sc in scripts.ALL if sc.nargs >= 0}
        self._index = self.keys.index()
        self._pb = self._prefix.encode()
        self._plen = len(self._pb)
        self._packed_index = _pack_args((self._index,))
        # Packed (ttl, max_slots, prefix) of the append's ARGV, per max_slots value seen.
        self._append_tails: dict[int, bytes] = {0: _pack_args((self._ttl, 0, self._prefix))}
        self._closed = False
        log.debug("redis backend on %s, prefix %r, ttl %s", self._url, self._prefix, self._ttl or "none")

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

    def key(self, space: str, *parts: str) -> str:
        """A key of this tenant in `space` (e.g. key("tasks") -> "xp:tasks"), for the pump's streams."""
        return self.keys.key(space, *parts)

    def __repr__(self) -> str:
        return f"RedisBackend(url={self._url!r}, prefix={self._prefix!r}, ttl={self._ttl or None})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Workers rebuild their own pool from the config (connections cannot cross processes). A
        # process-local key travels along (pickled into a child this process starts, e.g. the
        # local worker pool of `xml-pipeline run`), so the child reads what this process signs.
        return (_rebuild, (self.config, self._signer.keys if self._signer.local else None))

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
            raise BackendUnavailable(
                f"Redis at {self._url} rejected the credentials of user {self._username or 'default'!r} "
                f"({what}): {self._scrub(e)}") from None
        except (RedisConnectionError, RedisTimeoutError) as e:
            attempts = 1 + (self._retry.get_retries() if retry else 0)
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
        body = _pack_args((*keys, *args))
        head = self._script_heads.get(script.name)  # probes the mechanism on first use
        if head is not None:  # one of the backend's own fixed-arity scripts: its head is packed already
            return self._roundtrip(head, body, script)
        # The pump's and workers' scripts (message_bus), and variadic ones: a head for this call.
        eval_head = _pack_head(b"EVAL", script.source.encode(), script.numkeys, len(args))
        return self._roundtrip(self._heads.head(script, len(args)), body, script, eval_head)

    def _roundtrip(self, head: bytes, body: bytes, script: scripts.LuaScript,
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

        def send(packed: bytes) -> Any:
            """One script (and its WAIT, when configured: both replies are read, so the connection
            stays in step even when the script is refused)."""
            conn.send_packed_command([packed + wait])
            try:
                return conn.read_response()
            finally:
                if wait:
                    self._check_wait(conn.read_response())

        def run(h: bytes) -> Any:
            try:
                return send(h + body)
            except NoScriptError:
                # Server restarted or SCRIPT FLUSH: EVAL runs the script and caches it again.
                return send((eval_head or self._eval_heads[script.name]) + body)

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

    def _scan(self, space: str) -> Iterator[bytes]:
        return self.client.scan_iter(match=self.keys.pattern(space), count=SCAN_COUNT)

    def _index_entries(self, kind: bytes) -> Iterator[list[bytes]]:
        """The index entries of `kind` (b"t" threads, b"c" chains), in batches of up to _BATCH.

        SSCAN returns every entry present for the whole walk at least once (de-duplicated here) and
        may or may not return entries added or removed meanwhile, the same contract as SCAN.
        """
        seen: set[bytes] = set()
        batch: list[bytes] = []
        for entry in self.client.sscan_iter(self._index, match=kind + b":*", count=SCAN_COUNT):
            if entry in seen:
                continue
            seen.add(entry)
            batch.append(entry)
            if len(batch) >= _BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    def _live(self, kind: bytes, limit: int | None = None) -> Iterator[tuple[str, bytes]]:
        """(id, value) of each live index entry of `kind`: value is the uuid for chains, 1 for
        threads. Dead entries (expired threads and mappings) are dropped from the index on the way."""
        found = 0
        for batch in self._index_entries(kind):
            reply = self._eval(scripts.INDEX_LIVE, (self._index,), (self._prefix, *batch))
            for i in range(0, len(reply), 2):
                entry, value = reply[i], reply[i + 1]
                try:
                    ident = entry[2:].decode()
                    if kind == b"t":
                        check_tagged_id(ident, "thread id")
                    else:
                        value.decode()
                except (UnicodeDecodeError, ValueError, AttributeError):
                    # Not something this library writes (a hand-made or corrupted entry): skipped,
                    # never a crash of every listing.
                    log.warning("prefix %r: skipping index entry %r, which this library never writes",
                                self._prefix, entry[:80])
                    continue
                yield ident, value
                found += 1
            if limit is not None and found >= limit:
                return

    # -- Context Buffer -------------------------------------------------------------------------
    def buffer_append(self, thread_id: str, slot_data: bytes, *, max_slots: int | None = None,
                      append_id: str | None = None) -> int:
        head = self._script_heads["append"]
        body = self._append_body(thread_id, slot_data, max_slots, append_id, -1)
        reply = self._do("buffer_append", lambda: self._roundtrip(head, body, scripts.APPEND))
        outcome = self.parse_append_reply(reply)
        if outcome is None:
            raise ThreadFullError(thread_id, max_slots or 0)
        if outcome.status == "repeat" and outcome.stored != bytes(slot_data):
            raise AppendIdConflict(thread_id, append_id or "", outcome.position)
        return outcome.position

    def buffer_append_at(self, thread_id: str, slot: bytes, index: int, *, max_slots: int | None = None,
                         append_id: str | None = None, items: Sequence[tuple[str, bytes]] = ()) -> Appended:
        """Compare-and-append (the append script with an expected index), then SET EX of each item,
        in one round trip (a pipeline, not a transaction). Every command is idempotent (the append
        through its id, generated per call when not given), so the whole batch is retried like
        buffer_append. A full thread raises ThreadFullError and its temp values are deleted again."""
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"index must be an integer >= 0, got {index!r}")
        head = self._script_heads["append"]
        body = self._append_body(thread_id, slot, max_slots, append_id, index)
        if items and self._wait_tail:
            self.temp_put_many(list(items))  # then the append alone, followed by its WAIT
            names = [self.keys.tmp(k) for k, _ in items]
            reply = self._do("buffer_append", lambda: self._roundtrip(head, body, scripts.APPEND))
        elif items:
            names = [self.keys.tmp(check_tagged_id(k, "temp key")) for k, _ in items]
            puts = self._pack_sets(names, [v for _, v in items])

            def run() -> Any:
                replies = self._pipeline(head + body + puts, 1 + len(names))
                first = replies[0]
                for r in replies[1:]:
                    if isinstance(r, Exception):
                        raise r
                if isinstance(first, NoScriptError) or (isinstance(first, ResponseError)
                                                        and redis_functions.mechanism_error(first)):
                    return self._roundtrip(head, body, scripts.APPEND)  # EVAL (cached again), or re-probed
                if isinstance(first, Exception):
                    raise first
                return first

            reply = self._do("buffer_append", run)
        else:
            names = []
            reply = self._do("buffer_append", lambda: self._roundtrip(head, body, scripts.APPEND))
            if type(reply) is int and reply >= 0:  # the common case, without the general parse
                return Appended("stored", reply)
        outcome = self.parse_append_reply(reply)
        if outcome is None:
            if names:
                self._do("temp_delete", lambda: self.client.delete(*names))
            raise ThreadFullError(thread_id, max_slots or 0)
        return outcome

    @staticmethod
    def parse_append_reply(reply: Any) -> Appended | None:
        """The append script's reply as an Appended (None: the thread is full)."""
        if isinstance(reply, int):
            return None if reply == scripts.THREAD_FULL else Appended("stored", reply)
        if isinstance(reply, list) and len(reply) >= 2 and isinstance(reply[1], int):
            if reply[0] == scripts.MOVED:
                return Appended("moved", reply[1])
            if reply[0] == scripts.REPEAT and len(reply) == 3:
                return Appended("repeat", reply[1], reply[2])
        raise BackendError(f"unexpected reply {reply!r:.80} from the append script")

    def _append_body(self, thread_id: str, slot: bytes, max_slots: int | None, append_id: str | None,
                     expected: int) -> bytes:
        """The packed KEYS and ARGV of the append script (after its EVALSHA head)."""
        check_tagged_id(thread_id, "thread_id")
        if not isinstance(slot, (bytes, bytearray, memoryview)):
            raise TypeError(f"slot must be bytes, got {type(slot).__name__}")
        if max_slots is not None and (isinstance(max_slots, bool) or not isinstance(max_slots, int)
                                      or max_slots < 1):
            raise ValueError(f"max_slots must be None or an integer >= 1, got {max_slots!r}")
        if append_id is None:
            # One id per call (96 random bits, stored as raw bytes): every retry of this call carries
            # it, so the server stores the slot once.
            aid = os.urandom(12)
        elif isinstance(append_id, str) and append_id:
            aid = append_id.encode()
        else:
            raise ValueError(f"append_id must be a non-empty string, got {append_id!r}")
        tid = thread_id.encode()
        n = self._plen + len(tid)
        tail = self._append_tails.get(max_slots or 0)
        if tail is None:
            tail = _pack_args((self._ttl, max_slots or 0, self._prefix))
            if len(self._append_tails) < 64:
                self._append_tails[max_slots or 0] = tail
        exp = b"%d" % expected
        # KEYS buffer:{T} op:{T} uuid:{T} meta:index, ARGV slot append_id ttl max_slots prefix
        # expected, packed in one go.
        return b"$%d\r\n%bbuffer:{%b}\r\n$%d\r\n%bop:{%b}\r\n$%d\r\n%buuid:{%b}\r\n%b$%d\r\n%b\r\n$%d\r\n%b\r\n%b$%d\r\n%b\r\n" % (
            n + 9, self._pb, tid, n + 5, self._pb, tid, n + 7, self._pb, tid, self._packed_index,
            len(slot), slot, len(aid), aid, tail, len(exp), exp)

    def _pipeline(self, packed: bytes, count: int, *, best_effort_tail: int = 0) -> list[Any]:
        """Send already packed commands in one write and read their `count` replies; a command's
        error reply is returned in its place (every reply is read, so the connection stays in step).
        Connection errors are raised, and that connection dropped, as in _roundtrip."""
        direct = self._direct
        if direct is not None and self._direct_owner == threading.get_ident():
            return direct.pipeline(packed, count, best_effort_tail=best_effort_tail)
        pool = self._pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([packed])
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
        return self._pipeline(self.pack_commands(commands), len(commands), best_effort_tail=best_effort_tail)

    def _pack_sets(self, names: list[str], values: list[bytes]) -> bytes:
        """SET name value EX ttl, for each pair, in RESP."""
        ttl = b"%d" % (self._ttl or DEFAULT_TEMP_TTL)
        tail = b"$2\r\nEX\r\n$%d\r\n%b\r\n" % (len(ttl), ttl)
        out = []
        for name, value in zip(names, values):
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise TypeError(f"data must be bytes, got {type(value).__name__}")
            nb = name.encode()
            out.append(b"*5\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n%b" % (len(nb), nb, len(value), value, tail))
        return b"".join(out)

    def buffer_get_thread(self, thread_id: str) -> list[bytes]:
        key = self.keys.buffer(check_tagged_id(thread_id, "thread_id"))
        return self._do("buffer_get_thread", lambda: cast("list[bytes]", self.client.lrange(key, 0, -1)))

    def buffer_get_slot(self, thread_id: str, index: int) -> bytes | None:
        key = self.keys.buffer(check_tagged_id(thread_id, "thread_id"))
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        return self._do("buffer_get_slot", lambda: cast("bytes | None", self.client.lindex(key, index)))

    def buffer_thread_len(self, thread_id: str) -> int:
        key = self.keys.buffer(check_tagged_id(thread_id, "thread_id"))
        return int(self._do("buffer_thread_len", lambda: self.client.llen(key)))

    def buffer_thread_exists(self, thread_id: str) -> bool:
        key = self.keys.buffer(check_tagged_id(thread_id, "thread_id"))
        return bool(self._do("buffer_thread_exists", lambda: self.client.exists(key)))

    def buffer_delete_thread(self, thread_id: str) -> bool:
        check_tagged_id(thread_id, "thread_id")
        keys = (self.keys.buffer(thread_id), self.keys.op(thread_id), self._index)
        # Retried: deleting twice leaves the same state (a retry after a lost reply reports False).
        return bool(self._do("buffer_delete_thread",
                             lambda: self._eval(scripts.DELETE_THREAD, keys, (thread_id,))))

    def buffer_list_threads(self) -> list[str]:
        return self._do("buffer_list_threads", lambda: sorted(tid for tid, _ in self._live(b"t")))

    def buffer_clear(self) -> int:
        """Delete every thread of this prefix (buffers and their append ids); returns the thread count."""
        return self._do("buffer_clear", lambda: self._clear_index(b"t"))

    # -- Thread Registry ------------------------------------------------------------------------
    def registry_set(self, chain: str, uuid: str) -> None:
        self._check_chain(chain)
        check_tagged_id(uuid, "uuid")
        keys = (self.keys.chain(chain), self.keys.uuid(uuid), self._index)
        args = (chain, uuid, self._ttl, self._prefix)
        self._do("registry_set", lambda: self._eval(scripts.REGISTRY_SET, keys, args))

    def registry_get_or_create(self, chain: str, uuid: str) -> str:
        self._check_chain(chain)
        check_tagged_id(uuid, "uuid")
        keys = (self.keys.chain(chain), self.keys.uuid(uuid), self._index)
        args = (chain, uuid, self._ttl, self._prefix)
        # Retrying is harmless: a repeat finds the mapping the first attempt made and returns it.
        winner = self._do("registry_get_or_create", lambda: self._eval(scripts.GET_OR_CREATE, keys, args))
        return winner.decode() if isinstance(winner, bytes) else str(winner)

    def registry_get_uuid(self, chain: str) -> str | None:
        key = self.keys.chain(self._check_chain(chain))
        value = self._do("registry_get_uuid", lambda: cast("bytes | None", self.client.get(key)))
        return None if value is None else value.decode()

    def registry_get_chain(self, uuid: str) -> str | None:
        key = self.keys.uuid(check_tagged_id(uuid, "uuid"))
        value = self._do("registry_get_chain", lambda: cast("bytes | None", self.client.get(key)))
        return None if value is None else value.decode()

    def registry_delete(self, uuid: str) -> bool:
        check_tagged_id(uuid, "uuid")
        keys, args = (self.keys.uuid(uuid), self._index), (uuid, self._prefix)
        return bool(self._do("registry_delete", lambda: self._eval(scripts.REGISTRY_DELETE, keys, args)))

    def registry_list_all(self) -> dict[str, str]:
        return self._do("registry_list_all", lambda: {uuid.decode(): chain for chain, uuid in self._live(b"c")})

    def registry_clear(self) -> int:
        """Delete every registry entry of this prefix; returns the number of mappings removed."""
        return self._do("registry_clear", lambda: self._clear_index(b"c"))

    @staticmethod
    def _check_chain(chain: object) -> str:
        if not isinstance(chain, str) or not chain:
            raise ValueError(f"chain must be a non-empty string, got {chain!r}")
        return chain

    # -- Temporary data -------------------------------------------------------------------------
    def temp_put(self, key: str, data: bytes, *, ttl: int | None = None) -> None:
        name = self.keys.tmp(check_tagged_id(key, "temp key"))
        if ttl is None:
            ttl = self._ttl or DEFAULT_TEMP_TTL
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
            raise ValueError(f"ttl must be a whole number of seconds >= 1, got {ttl!r}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        self._do("temp_put", lambda: self.client.set(name, data, ex=ttl))

    def temp_get(self, key: str) -> bytes | None:
        name = self.keys.tmp(check_tagged_id(key, "temp key"))
        return self._do("temp_get", lambda: cast("bytes | None", self.client.get(name)))

    def temp_delete(self, *keys: str) -> int:
        if not keys:
            return 0
        names = [self.keys.tmp(check_tagged_id(k, "temp key")) for k in keys]
        return int(self._do("temp_delete", lambda: self.client.delete(*names)))

    # -- Batches (one round trip each; the worker data flow uses them) ---------------------------
    def temp_put_many(self, items: list[tuple[str, bytes]]) -> None:
        """temp_put of each (key, data) with the default TTL, in one pipeline (retried: idempotent)."""
        if not items:
            return
        names = [self.keys.tmp(check_tagged_id(k, "temp key")) for k, _ in items]
        packed = self._pack_sets(names, [v for _, v in items])

        def run() -> None:
            for r in self._pipeline(packed, len(names)):
                if isinstance(r, Exception):
                    raise r

        self._do("temp_put", run)

    def temp_get_many(self, keys: list[str]) -> list[bytes | None]:
        """MGET of the temp keys: their values (None where a key is gone), in order."""
        if not keys:
            return []
        names = [self.keys.tmp(check_tagged_id(k, "temp key")) for k in keys]
        packed = _pack_command(b"MGET", names)

        def run() -> list[bytes | None]:
            (reply,) = self._pipeline(packed, 1)
            if isinstance(reply, Exception):
                raise reply
            return list(reply)

        return self._do("temp_get", run)

    def temp_take(self, key: str, *also_delete: str) -> bytes | None:
        """GET key, then DEL key and `also_delete`, in one pipeline (not retried: a repeat would
        find the key deleted)."""
        names = [self.keys.tmp(check_tagged_id(k, "temp key")) for k in (key, *also_delete)]
        packed = _pack_command(b"GET", names[:1]) + _pack_command(b"DEL", names)

        def run() -> bytes | None:
            got, deleted = self._pipeline(packed, 2)
            for r in (got, deleted):
                if isinstance(r, Exception):
                    raise r
            return got

        return self._do("temp_get+delete", run, retry=False)

    # -- Index helpers ----------------------------------------------------------------------------
    def _clear_index(self, kind: bytes) -> int:
        # Batches are collected first: deleting entries while SSCAN walks the set is allowed but
        # would make the walk's guarantees harder to reason about.
        batches = list(self._index_entries(kind))
        return sum(int(self._eval(scripts.INDEX_CLEAR, (self._index,), (self._prefix, *b))) for b in batches)

    def _count(self, kind: bytes, limit: int = INFO_COUNT_LIMIT) -> tuple[int, bool]:
        n = sum(1 for _ in self._live(kind, limit))
        return min(n, limit), n >= limit

    def reindex(self) -> dict[str, int]:
        """Add every thread and registry chain of this prefix to the index, from a SCAN of the keys.

        For data written before the index existed (or an index deleted by hand). Needs SCAN, so run
        it as a user allowed to (an organism's restricted user is not). Returns the counts added.
        """
        def run() -> dict[str, int]:
            added = {"threads": 0, "chains": 0}
            for space, kind, name in (("buffer", "t", "threads"), ("chain", "c", "chains")):
                batch: list[str] = []
                for raw in self._scan(space):
                    try:
                        key = raw.decode()
                        batch.append(f"{kind}:" + (self.keys.thread_of(key) if kind == "t" else self.keys.chain_of(key)))
                    except (UnicodeDecodeError, ValueError):
                        continue  # not a key of our layout (never written by this library)
                    if len(batch) >= _BATCH:
                        added[name] += int(self.client.sadd(self._index, *batch))
                        batch = []
                if batch:
                    added[name] += int(self.client.sadd(self._index, *batch))
            if self._ttl:
                self.client.expire(self._index, self._ttl)
            return added
        return self._do("reindex", run)

    # -- Lifecycle and monitoring -----------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        server = self._do("info", lambda: self.client.info("server"))
        threads, capped_t = self._do("info", lambda: self._count(b"t"))
        entries, capped_r = self._do("info", lambda: self._count(b"c"))
        return {
            "backend": "redis",
            "url": self._url,
            "prefix": self._prefix,
            "ttl": self._ttl or None,
            "ttl_seconds": self._ttl,
            "buffer_threads": threads,
            "registry_entries": entries,
            "counts_capped": capped_t or capped_r,
            # Valkey reports its own version beside the Redis version it is compatible with.
            "server": str(server.get("server_name") or "redis"),
            "server_version": str(server.get("valkey_version") or server.get("redis_version")),
            "signing": "process-local (no key configured)" if self._signer.local else "configured",
        }

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

    def __enter__(self) -> "RedisBackend":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- Packed commands for the pump's asyncio pipe (redis_pipe.py): the same commands as the -------
    # -- methods above, packed but not sent ------------------------------------------------------
    def pipe_capable(self) -> bool:
        """True when RedisPipe can talk to this server (plain TCP or a unix socket, not TLS)."""
        return urlsplit(self.config.redis_url).scheme in ("redis", "unix") and not self._closed

    def connection_kwargs(self) -> dict[str, Any]:
        """host/port or path, db, username, password and client_name of this backend's connections."""
        kw = dict(self._pool.connection_kwargs)
        return {k: kw.get(k) for k in ("host", "port", "path", "db", "username", "password", "client_name")}

    def scrub(self, error: object) -> str:
        """`error` as text with this backend's password (if any) blanked."""
        return self._scrub(error if isinstance(error, Exception) else Exception(str(error)))

    def pack_append_at(self, thread_id: str, slot: bytes, index: int, *, max_slots: int | None,
                       append_id: str | None, items: Sequence[tuple[str, bytes]]) -> tuple[bytes, int]:
        """buffer_append_at's commands (the append script, then SET EX of each item) and their
        reply count; parse the first reply with parse_append_reply."""
        body = self._append_body(thread_id, slot, max_slots, append_id, index)
        names = [self.keys.tmp(check_tagged_id(k, "temp key")) for k, _ in items]
        puts = self._pack_sets(names, [v for _, v in items]) if items else b""
        return self._script_heads["append"] + body + puts, 1 + len(items)

    def pack_take(self, key: str, *also_delete: str) -> bytes:
        """temp_take's commands (GET key, DEL key + also_delete): two replies."""
        names = [self.keys.tmp(check_tagged_id(k, "temp key")) for k in (key, *also_delete)]
        return _pack_command(b"GET", names[:1]) + _pack_command(b"DEL", names)

    def pack_delete(self, *keys: str) -> bytes:
        """temp_delete's command (one DEL): one reply."""
        return _pack_command(b"DEL", [self.keys.tmp(check_tagged_id(k, "temp key")) for k in keys])

    @staticmethod
    def pack_commands(commands: list[tuple[Any, ...]]) -> bytes:
        """Commands (tuples of str / bytes / int) in RESP, as send_commands packs them."""
        return b"".join(_pack_command(str(c[0]).encode(), list(c[1:])) for c in commands)

    # -- A worker's own connection ------------------------------------------------------------------
    _direct: DirectConnection | None = None
    _direct_owner = 0

    def use_direct_connection(self) -> None:
        """Send the calling thread's batched commands (temp_get_many, temp_put_many, temp_take,
        buffer_append_at, send_commands) through one connection of its own instead of the pool:
        for a worker process's single task loop. Other threads keep using the pool. Same commands,
        same errors, same retries (see redis_pipe.DirectConnection). No-op over TLS (rediss://)."""
        direct = self.new_direct_connection()
        if direct is not None:
            self._direct = direct
            self._direct_owner = threading.get_ident()

    def new_direct_connection(self) -> DirectConnection | None:
        """A DirectConnection to this backend's server for one thread's own use (None over TLS)."""
        if not self.pipe_capable():
            return None
        cfg = self.config
        return DirectConnection(self.connection_kwargs(), socket_timeout=cfg.socket_timeout,
                                connect_timeout=cfg.connect_timeout, pack=self.pack_commands)


def _rebuild(config: BackendConfig, local_keys: tuple[bytes, ...] | None) -> RedisBackend:
    """Unpickle a RedisBackend: its own pool, and its parent's process-local key if it had one."""
    return RedisBackend(config, signer=Signer(local_keys, local=True) if local_keys else None)
