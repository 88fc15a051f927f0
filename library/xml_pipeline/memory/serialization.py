"""serialize_slot / deserialize_slot: pickled slots inside signed envelopes.

The spec stores slots as pickles. Unpickling runs code chosen by whoever wrote the bytes, so a
pickle is only ever unpickled after its envelope's HMAC verified (signing.py): a forged, truncated
or foreign blob raises SlotIntegrityError and nothing is unpickled.

Which key signs: the `signer=` argument when given (ContextBuffer passes its backend's signer, so
every process sharing a backend agrees); otherwise the process default, built from XP_SIGNING_KEY
when it is set (first key signs, all verify), else a random key private to this process, which is
right for the single-process memory backend and useless to anyone else.
"""
from __future__ import annotations

import os
import pickle
import threading
from typing import Any

from ..contract import ENV_SIGNING_KEY
from ..errors import BackendError
from .signing import Signer, parse_keys


_lock = threading.Lock()
_default: tuple[str | None, Signer] | None = None
_random: Signer | None = None  # kept for the life of the process, whatever XP_SIGNING_KEY does


def default_signer() -> Signer:
    """The process default key ring: XP_SIGNING_KEY if set, else one random key per process.

    Re-read when XP_SIGNING_KEY changes, so a rotation applied to the environment takes effect.
    """
    global _default, _random
    raw = os.environ.get(ENV_SIGNING_KEY) or None
    current = _default
    if current is not None and current[0] == raw:
        return current[1]
    with _lock:
        current = _default
        if current is None or current[0] != raw:
            keys = parse_keys(raw, ENV_SIGNING_KEY)
            if keys:
                signer = Signer(keys)
            else:
                if _random is None:
                    # After a fork the child keeps the parent's random key, as fork users expect.
                    _random = Signer.random()
                signer = _random
            current = _default = (raw, signer)
        return current[1]


def serialize_slot(slot: Any, *, signer: Signer | None = None) -> bytes:
    """Pickle `slot` (normally a BufferSlot) and wrap it in a signed envelope."""
    body = pickle.dumps(slot, protocol=pickle.HIGHEST_PROTOCOL)
    return (signer or default_signer()).sign(body)


def deserialize_slot(data: bytes, *, signer: Signer | None = None) -> Any:
    """Verify the envelope, then unpickle. Raises SlotIntegrityError (before unpickling) if the
    signature does not check out."""
    body = (signer or default_signer()).verify(data)
    try:
        return pickle.loads(body)
    except Exception as e:  # authentic, but unreadable here (e.g. a class this process cannot import)
        raise BackendError(f"signed slot could not be unpickled: {type(e).__name__}: {e}") from e
