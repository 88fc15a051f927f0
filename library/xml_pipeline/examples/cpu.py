"""CPU-bound example handlers (cpu_bound: true — they run in worker processes)."""
from __future__ import annotations

import hashlib
from xml.sax.saxutils import quoteattr

from xml_pipeline.message_bus import Message, MessageError

#: Upper bound of <count below=".."/>, so a typo cannot occupy a worker for hours.
MAX_BELOW = 5_000_000


def _int_attr(message: Message, tag: str, attr: str, default: int, high: int) -> int:
    el = message.element()
    if el is None or el.tag != tag:
        raise MessageError(f"expected <{tag} {attr}=\"N\"/>, got {message.payload[:80]!r}")
    raw = el.get(attr, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise MessageError(f"<{tag} {attr}=...> must be an integer, got {raw!r}") from None
    if not 0 <= value <= high:
        raise MessageError(f"<{tag} {attr}=...> must be between 0 and {high}, got {value}")
    return value


def primes_below(n: int) -> int:
    """Count primes below n by trial division: deliberately plain Python, so it burns CPU."""
    if n <= 2:
        return 0
    count = 1  # 2
    for candidate in range(3, n, 2):
        d = 3
        while d * d <= candidate:
            if candidate % d == 0:
                break
            d += 2
        else:
            count += 1
    return count


def count_primes(message: Message) -> str:
    """<count below="N" ref="..."/> → <primes below="N" count="C" ref="..."/>"""
    below = _int_attr(message, "count", "below", 10_000, MAX_BELOW)
    el = message.element()
    ref = el.get("ref") if el is not None else None
    ref_attr = f" ref={quoteattr(ref)}" if ref else ""
    return f"<primes below=\"{below}\" count=\"{primes_below(below)}\"{ref_attr}/>"


def burn(message: Message) -> str:
    """<work rounds="N">data</work> → <done rounds="N" bytes=".." digest=".."/>

    Hashes the payload once, then the digest `rounds` more times (SHA-256): a fixed amount of CPU
    per task, plus the cost of reading the payload — the benchmark's unit of work.
    """
    payload = message.payload.encode("utf-8")
    start = payload.find(b"rounds=\"")
    rounds = 1000
    if start >= 0:
        end = payload.find(b"\"", start + 8)
        rounds = int(payload[start + 8:end])
    digest = hashlib.sha256(payload).digest()
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return f"<done rounds=\"{rounds}\" bytes=\"{len(payload)}\" digest=\"{digest.hex()[:16]}\"/>"
