"""serialize_slot / deserialize_slot: pickled slots inside signed envelopes.

The spec stores slots as pickles. Unpickling runs code chosen by whoever wrote the bytes, so a
pickle is only ever unpickled after its envelope's HMAC verified (signing.py): a forged, truncated
or foreign blob raises SlotIntegrityError and nothing is unpickled.

These module-level functions make *unbound* envelopes (a fixed context, no thread or position):
for a slot handled outside a context buffer. ContextBuffer binds every slot it stores to its
namespace, thread and index instead, so an unbound blob never verifies inside a buffer and a slot
read from a buffer never verifies as unbound.

Which key signs: the `signer=` argument when given; otherwise the process default, built from
XP_SIGNING_KEY when it is set (first key signs, all verify), else a random key private to this
process (`local_signer()`), which is right for one process and useless to anyone else.
"""
from __future__ import annotations

import os
import pickle
import threading
from typing import Any

from ..contract import ENV_SIGNING_KEY
from ..errors import BackendError
from .signing import Signer, parse_keys

#: The context of unbound slot envelopes (serialize_slot without a place).
UNBOUND_SLOT = b"xml-pipeline unbound slot"

_lock = threading.Lock()
_default: tuple[str | None, Signer] | None = None
_random: Signer | None = None  # kept for the life of the process, whatever XP_SIGNING_KEY does


def local_signer() -> Signer:
    """The random key of this process (made on first use; a forked child keeps its parent's)."""
    global _random
    with _lock:
        if _random is None:
            _random = Signer.random(local=True)
        return _random


def default_signer() -> Signer:
    """The process default key ring: XP_SIGNING_KEY if set, else `local_signer()`.

    Re-read when XP_SIGNING_KEY changes, so a rotation applied to the environment takes effect.
    """
    global _default
    raw = os.environ.get(ENV_SIGNING_KEY) or None
    current = _default
    if current is not None and current[0] == raw:
        return current[1]
    keys = parse_keys(raw, ENV_SIGNING_KEY)
    signer = Signer(keys) if keys else local_signer()
    with _lock:
        current = _default
        if current is None or current[0] != raw:
            current = _default = (raw, signer)
        return current[1]


def serialize_slot(slot: Any, *, signer: Signer | None = None) -> bytes:
    """Pickle `slot` (normally a BufferSlot) and wrap it in a signed, unbound envelope."""
    body = pickle.dumps(slot, protocol=pickle.HIGHEST_PROTOCOL)
    return (signer or default_signer()).sign(body, context=UNBOUND_SLOT)


def deserialize_slot(data: bytes, *, signer: Signer | None = None) -> Any:
    """Verify the unbound envelope, then unpickle. Raises SlotIntegrityError (before unpickling) if
    the signature does not check out."""
    return unpickle((signer or default_signer()).verify(data, context=UNBOUND_SLOT))


def unpickle(body: bytes) -> Any:
    """pickle.loads of a body whose envelope verified."""
    try:
        return pickle.loads(body)
    except Exception as e:  # authentic, but unreadable here (e.g. a class this process cannot import)
        raise BackendError(f"signed slot could not be unpickled: {type(e).__name__}: {e}") from e
