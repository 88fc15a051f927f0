"""Signed envelopes for every blob the backends store, bound to where the blob belongs.

Slots are pickled (the Shared Backend API stores pickled slots), and unpickling attacker-controlled bytes runs code. So every
stored blob is wrapped in a versioned envelope with an HMAC-SHA256, checked with
`hmac.compare_digest` before anything is unpickled:

    b"XPS" | version 2 (1 byte) | key id (4 bytes) | HMAC-SHA256 (32 bytes) | n (1 byte) | append id (n bytes) | body

The MAC covers the version, the key id, the append id, the body **and a context that is not stored**:
the caller supplies it again when it reads. For a context-buffer slot the context is its place —
the backend's namespace (the Redis prefix), the thread id and the slot's index — so a genuine slot
copied to another thread or prefix, re-pushed at a later position or swapped with another one no
longer verifies where it now lies (`SlotPlace`). Blobs that belong nowhere in particular (the worker
data flow's temp values, `serialize_slot` without a backend) use their own fixed contexts, which no
slot place can equal (contexts are length-prefixed and slot contexts start with b"slot\\0").

`key id` is the first 4 bytes of SHA-256 over the key, so verification picks the right key of a
rotation ring at once. A ring is (signing key, *fallback keys): new blobs are signed with the first;
blobs signed with any of them verify.

Version 1 envelopes (no context, no append id) are refused with a message saying so: they cannot
prove where they belong (docs/storage.md, "Signing").
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import ConfigError, SlotIntegrityError

MAGIC = b"XPS"
VERSION = 2
_HEAD = MAGIC + bytes((VERSION,))
_HEADER = len(MAGIC) + 1 + 4
_MAC_LEN = 32
_MAC_END = _HEADER + _MAC_LEN
#: The smallest envelope: header, MAC and the append id's length byte.
OVERHEAD = _MAC_END + 1
MAX_APPEND_ID = 255
_SLOT_TAG = b"slot\0"
#: A slot's index in its context: 8 bytes, big-endian, signed.
_INDEX = struct.Struct(">q")


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"xml-pipeline key id\x00" + key).digest()[:4]


def parse_keys(value: str | bytes | Iterable[str | bytes] | None, field: str = "signing_key") -> tuple[bytes, ...]:
    """Turn 'k1,k2' or a list of keys into a ring of bytes keys (first signs, all verify)."""
    if value is None:
        return ()
    if isinstance(value, (str, bytes)):
        sep = "," if isinstance(value, str) else b","
        parts: list[str | bytes] = [p for p in value.split(sep) if p.strip()]  # type: ignore[arg-type]
    else:
        parts = list(value)
    keys: list[bytes] = []
    for p in parts:
        k = p.strip().encode() if isinstance(p, str) else bytes(p).strip()
        if len(k) < 16:
            raise ConfigError(field, f"a signing key is {len(k)} bytes long, at least 16 are required",
                              "random strings of 16 or more characters, comma-separated for rotation")
        keys.append(k)
    return tuple(keys)


def _context_len(context: bytes) -> bytes:
    if len(context) > 0xFFFF:
        raise ValueError(f"a signing context is at most 65535 bytes, got {len(context)}")
    return len(context).to_bytes(2, "big")


def _index_bytes(index: int) -> bytes:
    return _INDEX.pack(index)


def slot_context(namespace: str, thread_id: str) -> bytes:
    """The part of a slot's context shared by every slot of one thread (the index follows it)."""
    ns, tid = namespace.encode(), thread_id.encode()
    return _SLOT_TAG + _context_len(ns) + ns + _context_len(tid) + tid


class Signer:
    """An HMAC key ring. Immutable; safe to share between threads and to pickle into workers."""

    __slots__ = ("_keys", "_ids", "_pads", "_sign_id", "_sign_key", "local")

    def __init__(self, keys: Sequence[bytes], *, local: bool = False) -> None:
        if not keys:
            raise ValueError("a Signer needs at least one key")
        self._keys = tuple(keys)
        self._ids = {_key_id(k): k for k in reversed(self._keys)}
        self._sign_key = self._keys[0]
        self._sign_id = _key_id(self._sign_key)
        # HMAC with the keyed inner/outer SHA-256 states computed once per key: copying a state is
        # far cheaper than hmac.new() (OpenSSL 3 looks the algorithm up again on every call), and
        # every slot of every read is verified.
        self._pads = {kid: _pads(k) for kid, k in self._ids.items()}
        #: True for a random key private to this process (no key configured): what it signs, only
        #: this process and the children it hands the key to can read.
        self.local = local

    @classmethod
    def random(cls, *, local: bool = False) -> "Signer":
        return cls((os.urandom(32),), local=local)

    @property
    def keys(self) -> tuple[bytes, ...]:
        return self._keys

    def sign(self, body: bytes, *, context: bytes = b"", append_id: bytes = b"") -> bytes:
        """An envelope of `body` (and `append_id`, stored in clear) bound to `context`."""
        if len(append_id) > MAX_APPEND_ID:
            raise ValueError(f"an append id is at most {MAX_APPEND_ID} bytes, got {len(append_id)}")
        head = MAGIC + bytes((VERSION,)) + self._sign_id
        tail = bytes((len(append_id),)) + append_id
        mac = _mac(self._pads[self._sign_id], head, _context_len(context), context, tail, body)
        return head + mac + tail + body

    def open(self, blob: bytes, *, context: bytes = b"") -> tuple[bytes, bytes]:
        """(append id, body) of a valid envelope bound to `context`, else SlotIntegrityError
        (nothing is unpickled)."""
        blob, pads = self._check(blob)
        inner = pads[0].copy()
        inner.update(blob[:_HEADER])
        inner.update(_context_len(context))
        inner.update(context)
        return self._finish(blob, pads, inner)

    def verify(self, blob: bytes, *, context: bytes = b"") -> bytes:
        """The body of a valid envelope bound to `context`, else SlotIntegrityError."""
        return self.open(blob, context=context)[1]

    def place(self, namespace: str, thread_id: str) -> "SlotPlace":
        """Signs and opens the slots of one thread of one namespace."""
        return SlotPlace(self, thread_id, slot_context(namespace, thread_id))

    def _check(self, blob: object) -> tuple[bytes, tuple[Any, Any]]:
        if type(blob) is not bytes:
            if not isinstance(blob, (bytes, bytearray, memoryview)):
                raise SlotIntegrityError(f"stored value is {type(blob).__name__}, not bytes")
            blob = bytes(blob)
        if len(blob) < OVERHEAD or blob[:3] != MAGIC:
            raise SlotIntegrityError("stored value is not a signed xml-pipeline envelope (truncated or foreign)")
        if blob[3] != VERSION:
            if blob[3] == 1:
                raise SlotIntegrityError(
                    "envelope version 1 is refused: it was written by an xml-pipeline older than the "
                    "binding of slots to their thread and position, and cannot prove where it belongs "
                    "(delete the thread, or read it with that older version)")
            raise SlotIntegrityError(f"unsupported envelope version {blob[3]} (this library reads version {VERSION})")
        pads = self._pads.get(blob[4:8])
        if pads is None:
            raise SlotIntegrityError("envelope was signed with a key this process does not know "
                                     "(check XP_SIGNING_KEY / backend.signing_key)")
        return blob, pads

    @staticmethod
    def _finish(blob: bytes, pads: tuple[Any, Any], inner: Any) -> tuple[bytes, bytes]:
        inner.update(memoryview(blob)[_MAC_END:])
        outer = pads[1].copy()
        outer.update(inner.digest())
        if not hmac.compare_digest(blob[_HEADER:_MAC_END], outer.digest()):
            raise SlotIntegrityError("envelope signature does not match here: the value was forged, corrupted, "
                                     "or copied from another thread, position or prefix")
        n = blob[_MAC_END]
        start = OVERHEAD + n
        if len(blob) < start:
            raise SlotIntegrityError("envelope is truncated inside its append id")
        return blob[OVERHEAD:start], blob[start:]

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_signer, (self._keys, self.local))

    def __repr__(self) -> str:  # never show key material
        return f"Signer(keys={len(self._keys)}, local={self.local})"


class SlotPlace:
    """The signing context of one thread: `sign(index, ...)` binds a slot to (namespace, thread,
    index); `open(blob, index)` verifies it there. The keyed states after the thread's part of the
    context are computed once per key, so each slot costs one state copy, as an unbound check would
    (every slot of every read goes through `open` or `bodies`)."""

    __slots__ = ("thread_id", "signer", "_signer", "_context", "_len", "_states")

    def __init__(self, signer: Signer, thread_id: str, context: bytes) -> None:
        self.thread_id = thread_id
        self.signer = self._signer = signer
        self._context = context
        self._len = _context_len(context + bytes(8))
        # envelope head (magic, version, key id: a blob's first 8 bytes) -> (inner state after the
        # head and the context, outer pad state). One lookup of a blob's head checks its magic,
        # its version and its key at once.
        self._states: dict[bytes, tuple[Any, Any]] = {}

    def _state(self, kid: bytes) -> tuple[Any, Any] | None:
        head = _HEAD + kid
        state = self._states.get(head)
        if state is None:
            pads = self._signer._pads.get(kid)  # noqa: SLF001 - the signer's own key states
            if pads is None:
                return None
            inner = pads[0].copy()
            inner.update(head)
            inner.update(self._len)
            inner.update(self._context)
            state = self._states[head] = (inner, pads[1])
        return state

    def sign(self, index: int, append_id: bytes, body: bytes | memoryview) -> bytes:
        if len(append_id) > MAX_APPEND_ID:
            raise ValueError(f"an append id is at most {MAX_APPEND_ID} bytes, got {len(append_id)}")
        kid = self._signer._sign_id  # noqa: SLF001
        state = self._state(kid)
        assert state is not None
        tail = bytes((len(append_id),)) + append_id
        inner = state[0].copy()
        inner.update(_INDEX.pack(index) + tail)
        inner.update(body)
        outer = state[1].copy()
        outer.update(inner.digest())
        return b"".join((_HEAD, kid, outer.digest(), tail, body))  # one copy of the body

    def open(self, blob: bytes, index: int, *, view: bool = False) -> tuple[bytes, bytes]:
        """(append id, body) of a slot that verifies at `index` of this thread, else SlotIntegrityError.
        `view=True`: the body as a memoryview of `blob` instead of a copy (for a large slot that is
        only unpickled)."""
        state = self._states.get(blob[:8]) if type(blob) is bytes else None
        if state is None:
            blob, _pads = self._signer._check(blob)  # noqa: SLF001 - raises for anything malformed
            state = self._state(blob[4:8])
            assert state is not None
        if len(blob) < OVERHEAD:
            raise SlotIntegrityError("stored value is not a signed xml-pipeline envelope (truncated or foreign)")
        inner = state[0].copy()
        inner.update(_INDEX.pack(index))
        inner.update(memoryview(blob)[_MAC_END:])
        outer = state[1].copy()
        outer.update(inner.digest())
        if not hmac.compare_digest(blob[_HEADER:_MAC_END], outer.digest()):
            raise SlotIntegrityError("envelope signature does not match here: the value was forged, corrupted, "
                                     "or copied from another thread, position or prefix")
        start = OVERHEAD + blob[_MAC_END]
        if len(blob) < start:
            raise SlotIntegrityError("envelope is truncated inside its append id")
        if view:
            return blob[OVERHEAD:start], memoryview(blob)[start:]  # type: ignore[return-value]
        return blob[OVERHEAD:start], blob[start:]

    def bodies(self, blobs: Sequence[bytes]) -> list[bytes]:
        """The bodies of a whole thread's slots (blob i verified at index i), else SlotIntegrityError
        naming the first slot that fails. The check of `open`, inlined in one loop: every read of a
        thread comes here, and per slot the loop's own steps cost as much as the HMAC. A blob the
        fast path does not take (another type, an unknown head, a short or failing one) goes
        through `open_at`, which verifies it again or raises saying why."""
        out: list[bytes] = []
        append, states, compare, pack = out.append, self._states, hmac.compare_digest, _INDEX.pack
        for index, blob in enumerate(blobs):
            state = states.get(blob[:8]) if type(blob) is bytes else None
            if state is not None and len(blob) > _MAC_END:
                inner = state[0].copy()
                inner.update(pack(index))
                inner.update(blob[_MAC_END:])
                outer = state[1].copy()
                outer.update(inner.digest())
                start = OVERHEAD + blob[_MAC_END]
                if compare(blob[_HEADER:_MAC_END], outer.digest()) and len(blob) >= start:
                    append(blob[start:])
                    continue
            append(self.open_at(blob, index))
        return out

    def open_at(self, blob: bytes, index: int) -> bytes:
        """The body of `open`, with the error naming this thread and the slot's index."""
        try:
            return self.open(blob, index)[1]
        except SlotIntegrityError as e:
            raise SlotIntegrityError(f"thread {self.thread_id!r} slot {index}: {e}") from None


def _pads(key: bytes) -> tuple[Any, Any]:
    """SHA-256 states after absorbing key^ipad and key^opad (RFC 2104), to be copied per message."""
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\0")
    return (hashlib.sha256(bytes(b ^ 0x36 for b in key)), hashlib.sha256(bytes(b ^ 0x5C for b in key)))


def _mac(pads: tuple[Any, Any], *parts: bytes | memoryview) -> bytes:
    """HMAC-SHA256 of the concatenation of `parts` (identical to hmac.new(key, ..., sha256))."""
    inner = pads[0].copy()
    for part in parts:
        inner.update(part)
    outer = pads[1].copy()
    outer.update(inner.digest())
    return outer.digest()


def _rebuild_signer(keys: tuple[bytes, ...], local: bool) -> Signer:
    return Signer(keys, local=local)
