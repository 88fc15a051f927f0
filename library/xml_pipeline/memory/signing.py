"""Signed envelopes for every blob the backends store.

Slots are pickled (as the spec says), and unpickling attacker-controlled bytes runs code. So every
stored blob is wrapped in a versioned envelope with an HMAC-SHA256 over the body, and the MAC is
checked with `hmac.compare_digest` before anything is unpickled:

    b"XPS" | version (1 byte) | key id (4 bytes) | HMAC-SHA256 (32 bytes) | body

`key id` is the first 4 bytes of SHA-256 over the key, so verification picks the right key of a
rotation ring at once. A ring is (signing key, *fallback keys): new blobs are signed with the first;
blobs signed with any of them verify. The MAC also covers the version and key id bytes.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import ConfigError, SlotIntegrityError

MAGIC = b"XPS"
VERSION = 1
_HEADER = len(MAGIC) + 1 + 4
_MAC_LEN = 32
OVERHEAD = _HEADER + _MAC_LEN


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


class Signer:
    """An HMAC key ring. Immutable; safe to share between threads and to pickle into workers."""

    __slots__ = ("_keys", "_ids", "_pads", "_sign_id", "_sign_key", "derived")

    def __init__(self, keys: Sequence[bytes], *, derived: bool = False) -> None:
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
        #: True when the key was derived from non-secret data (no key configured): integrity
        #: against corruption only, not against someone who can write to the store.
        self.derived = derived

    @classmethod
    def random(cls) -> "Signer":
        return cls((os.urandom(32),))

    @classmethod
    def derive(cls, *material: str | bytes) -> "Signer":
        """A deterministic key from non-secret material (used only when no key is configured)."""
        h = hashlib.sha256(b"xml-pipeline derived signing key\x00")
        for m in material:
            h.update(m.encode() if isinstance(m, str) else m)
            h.update(b"\x00")
        return cls((h.digest(),), derived=True)

    @property
    def keys(self) -> tuple[bytes, ...]:
        return self._keys

    def sign(self, body: bytes) -> bytes:
        head = MAGIC + bytes((VERSION,)) + self._sign_id
        return head + _mac(self._pads[self._sign_id], head, body) + body

    def verify(self, blob: bytes) -> bytes:
        """Return the body of a valid envelope, else raise SlotIntegrityError (nothing is unpickled)."""
        if type(blob) is not bytes:
            if not isinstance(blob, (bytes, bytearray, memoryview)):
                raise SlotIntegrityError(f"stored value is {type(blob).__name__}, not bytes")
            blob = bytes(blob)
        if len(blob) < OVERHEAD or blob[:3] != MAGIC:
            raise SlotIntegrityError("stored value is not a signed xml-pipeline envelope (truncated or foreign)")
        if blob[3] != VERSION:
            raise SlotIntegrityError(f"unsupported envelope version {blob[3]} (this library reads version {VERSION})")
        pads = self._pads.get(blob[4:8])
        if pads is None:
            raise SlotIntegrityError("envelope was signed with a key this process does not know (check XP_SIGNING_KEY)")
        body = blob[OVERHEAD:]
        inner = pads[0].copy()
        inner.update(blob[:_HEADER])
        inner.update(body)
        outer = pads[1].copy()
        outer.update(inner.digest())
        if not hmac.compare_digest(blob[_HEADER:OVERHEAD], outer.digest()):
            raise SlotIntegrityError("envelope signature does not match: the value was forged or corrupted")
        return body

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_signer, (self._keys, self.derived))

    def __repr__(self) -> str:  # never show key material
        return f"Signer(keys={len(self._keys)}, derived={self.derived})"


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


def _rebuild_signer(keys: tuple[bytes, ...], derived: bool) -> Signer:
    return Signer(keys, derived=derived)
