"""RedisBackend: the SharedBackend on a Redis server (distributed deployments, pods).

What it guarantees, and why (docs/storage.md has the full story):
- Every multi-key write is one Lua script (redis_scripts.py): the append assigns the index, checks
  max_slots, records its append_id and refreshes the TTL of the thread's buffer and registry keys in
  one atomic step and one round trip (EVALSHA, EVAL on NOSCRIPT).
- Automatic retries (bounded, exponential backoff with jitter) only for operations where repeating is
  harmless: reads, and writes whose repetition leaves the same state. An append is made harmless by
  its append_id (generated per call when not given), so a retry after a timeout that hid a success
  returns the first index instead of storing the slot twice (redis_core.py runs the retries).
- Listing and clearing walk the prefix's index SET (redis_index.py), never KEYS or SCAN.

The layers: redis_wire.py is the wire (packing, hiredis replies, handshake, TLS); redis_core.py holds
the connections, retries and script running; redis_index.py the index walks and admin; this module
the SharedBackend's operations. The pump's RedisPipe and a worker's DirectConnection send the same
commands, packed by the pack_* methods below.
"""
from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Sequence
from typing import Any, cast

from redis.exceptions import NoScriptError, ResponseError

from ..errors import AppendIdConflict, BackendError, ThreadFullError
from .. import contract
from . import redis_functions
from . import redis_scripts as scripts
from .config import BackendConfig, compat_config
from .keys import check_tagged_id
from .protocol import Appended
from .redis_index import RedisIndex
from .redis_wire import LARGE_ARG, Packed, join_packed, pack_args, pack_command, pieces
from .serialization import default_signer
from .signing import Signer

__all__ = ["RedisBackend", "UnsignedBackendWarning", "DEFAULT_TEMP_TTL"]

log = logging.getLogger(__name__)

#: TTL of temporary keys (and the dedup window of appends) when the config sets no TTL.
DEFAULT_TEMP_TTL = 86400


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


def check_append_args(thread_id: str, slot: Any, max_slots: int | None, append_id: str | None) -> None:
    """The append's arguments as the contract takes them (TypeError / ValueError naming the one
    that is not)."""
    check_tagged_id(thread_id, "thread_id")
    if not isinstance(slot, (bytes, bytearray, memoryview)):
        raise TypeError(f"slot must be bytes, got {type(slot).__name__}")
    if max_slots is not None and (isinstance(max_slots, bool) or not isinstance(max_slots, int) or max_slots < 1):
        raise ValueError(f"max_slots must be None or an integer >= 1, got {max_slots!r}")
    if append_id is not None and not (isinstance(append_id, str) and append_id):
        raise ValueError(f"append_id must be a non-empty string, got {append_id!r}")


class RedisBackend(RedisIndex):
    """SharedBackend on Redis. Thread-safe; one connection pool per instance (per process)."""

    is_shared = True

    def __new__(cls, config: BackendConfig | str | None = None, **kwargs: Any) -> "RedisBackend":
        # A redis+cluster:// URL gets the cluster backend (redis_cluster.py), whichever constructor
        # was called.
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
        super().__init__(config, signer if signer is not None else _signer_for(config))
        self._pb = self._prefix.encode()
        self._plen = len(self._pb)
        self._packed_index = pack_args((self._index,))
        # Packed (ttl, max_slots, prefix) of the append's ARGV, per max_slots value seen.
        self._append_tails: dict[int, bytes] = {0: pack_args((self._ttl, 0, self._prefix))}
        log.debug("redis backend on %s, prefix %r, ttl %s", self._url, self._prefix, self._ttl or "none")

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
                replies = self._pipeline(join_packed(head, body, puts), 1 + len(names))
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
                     expected: int) -> Packed:
        """The packed KEYS and ARGV of the append script (after its EVALSHA head)."""
        check_append_args(thread_id, slot, max_slots, append_id)
        # Without an id, one per call (96 random bits, stored as raw bytes): every retry of this
        # call carries it, so the server stores the slot once.
        aid = os.urandom(12) if append_id is None else append_id.encode()
        tid = thread_id.encode()
        n = self._plen + len(tid)
        tail = self._append_tails.get(max_slots or 0)
        if tail is None:
            tail = pack_args((self._ttl, max_slots or 0, self._prefix))
            if len(self._append_tails) < 64:
                self._append_tails[max_slots or 0] = tail
        exp = b"%d" % expected
        # KEYS buffer:{T} op:{T} uuid:{T} meta:index, ARGV slot append_id ttl max_slots prefix
        # expected, packed in one go.
        if len(slot) <= LARGE_ARG:
            return b"$%d\r\n%bbuffer:{%b}\r\n$%d\r\n%bop:{%b}\r\n$%d\r\n%buuid:{%b}\r\n%b$%d\r\n%b\r\n$%d\r\n%b\r\n%b$%d\r\n%b\r\n" % (
                n + 9, self._pb, tid, n + 5, self._pb, tid, n + 7, self._pb, tid, self._packed_index,
                len(slot), slot, len(aid), aid, tail, len(exp), exp)
        # A large slot is not copied into the command: it is a piece of its own (redis_wire.pieces).
        return [b"$%d\r\n%bbuffer:{%b}\r\n$%d\r\n%bop:{%b}\r\n$%d\r\n%buuid:{%b}\r\n%b$%d\r\n" % (
                    n + 9, self._pb, tid, n + 5, self._pb, tid, n + 7, self._pb, tid, self._packed_index, len(slot)),
                slot,
                b"\r\n$%d\r\n%b\r\n%b$%d\r\n%b\r\n" % (len(aid), aid, tail, len(exp), exp)]

    def _pack_sets(self, names: list[str], values: list[bytes]) -> Packed:
        """SET name value EX ttl, for each pair, in RESP (a value over LARGE_ARG as its own piece)."""
        ttl = b"%d" % (self._ttl or DEFAULT_TEMP_TTL)
        tail = b"$2\r\nEX\r\n$%d\r\n%b\r\n" % (len(ttl), ttl)
        out: list[Any] = []
        large = False
        for name, value in zip(names, values):
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise TypeError(f"data must be bytes, got {type(value).__name__}")
            nb = name.encode()
            if len(value) > LARGE_ARG:
                large = True
                out += [b"*5\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n" % (len(nb), nb, len(value)), value, b"\r\n" + tail]
            else:
                out.append(b"*5\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n%b" % (len(nb), nb, len(value), value, tail))
        return pieces(out) if large else b"".join(out)

    def buffer_get_thread(self, thread_id: str) -> list[bytes]:
        key = self.keys.buffer(check_tagged_id(thread_id, "thread_id"))
        return self._do("buffer_get_thread", lambda: cast("list[bytes]", self.client.lrange(key, 0, -1)))

    def buffer_get_slot(self, thread_id: str, index: int) -> bytes | None:
        key = self.keys.buffer(check_tagged_id(thread_id, "thread_id"))
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if self._direct is None or self._direct_owner != threading.get_ident():
            return self._do("buffer_get_slot", lambda: cast("bytes | None", self.client.lindex(key, index)))
        packed = pack_command(b"LINDEX", [key, index])

        def run() -> bytes | None:
            # On the worker's DirectConnection: a large slot is read into its reusable buffer.
            (reply,) = self._pipeline(packed, 1)
            if isinstance(reply, Exception):
                raise reply
            return cast("bytes | None", reply)

        return self._do("buffer_get_slot", run)

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
        packed = pack_command(b"MGET", names)

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
        packed = pack_command(b"GET", names[:1]) + pack_command(b"DEL", names)

        def run() -> bytes | None:
            got, deleted = self._pipeline(packed, 2)
            for r in (got, deleted):
                if isinstance(r, Exception):
                    raise r
            return got

        return self._do("temp_get+delete", run, retry=False)

    def __enter__(self) -> "RedisBackend":
        return self

    # -- Packed commands for the pump's asyncio pipe (redis_pipe.py): the same commands as the -------
    # -- methods above, packed but not sent ------------------------------------------------------
    def pack_append_at(self, thread_id: str, slot: bytes, index: int, *, max_slots: int | None,
                       append_id: str | None, items: Sequence[tuple[str, bytes]]) -> tuple[Packed, int]:
        """buffer_append_at's commands (the append script, then SET EX of each item) and their
        reply count; parse the first reply with parse_append_reply."""
        body = self._append_body(thread_id, slot, max_slots, append_id, index)
        names = [self.keys.tmp(check_tagged_id(k, "temp key")) for k, _ in items]
        puts = self._pack_sets(names, [v for _, v in items]) if items else b""
        return join_packed(self._script_heads["append"], body, puts), 1 + len(items)

    def pack_take(self, key: str, *also_delete: str) -> bytes:
        """temp_take's commands (GET key, DEL key + also_delete): two replies."""
        names = [self.keys.tmp(check_tagged_id(k, "temp key")) for k in (key, *also_delete)]
        return pack_command(b"GET", names[:1]) + pack_command(b"DEL", names)

    def pack_delete(self, *keys: str) -> bytes:
        """temp_delete's command (one DEL): one reply."""
        return pack_command(b"DEL", [self.keys.tmp(check_tagged_id(k, "temp key")) for k in keys])


def _rebuild(config: BackendConfig, local_keys: tuple[bytes, ...] | None) -> RedisBackend:
    """Unpickle a RedisBackend: its own pool, and its parent's process-local key if it had one."""
    return RedisBackend(config, signer=Signer(local_keys, local=True) if local_keys else None)
