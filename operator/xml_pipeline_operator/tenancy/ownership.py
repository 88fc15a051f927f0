"""Who owns a prefix on the shared Redis, recorded on that Redis: no squatting, no blocking.

The operator's in-memory overlap check (overlap.py) only knows Organisms that exist. A prefix whose
Organism was deleted with `deletionPolicy: Retain` still holds that organism's data, and an Organism
that named it next would get an ACL user reading it. So every admitted prefix is recorded in one
hash on the shared Redis, `{xp-operator}:prefixes` (field: the prefix; value: JSON with the owner's
namespace, name and uid, and whether its data is retained after deletion). The key starts with '{',
which no tenant prefix can (keys.validate_prefix), so no tenant's ACL pattern reaches it: only the
operator's admin user reads or writes it.

Rules (`claim`):
- a prefix recorded for another Organism (another namespace/name) is refused, also while that
  Organism is deleted and its data retained;
- the same namespace/name may claim it back, also with a new uid: re-creating a deleted Organism
  under its old name is how retained data is taken up again (only someone allowed to create
  Organisms in that namespace can do that);
- a prefix that starts a recorded one (broader: `shop:` over `shop:eu:`) or is started by one
  (nested: `shop:eu:` under `shop:`) is refused too, so neither ACL patterns nor a cleanup can reach
  another organism's keys.

The default-prefix space (`xp:<namespace>.<name>:`) is kept free by a single-object rule in the
operator's model (model.reserved_prefix_problem): a written prefix may not start with `xp:` unless it
starts with the Organism's own default prefix.

Records leave with the data: `release` after the keys were deleted (deletionPolicy Delete),
`mark_retained` when they are kept.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis

from xml_pipeline.memory.keys import prefixes_overlap

#: The ownership records. Starts with '{': outside every tenant's key space.
OWNERS_KEY = "{xp-operator}:prefixes"
FIELD = "spec.backend.redis.prefix"


@dataclass(frozen=True)
class Owner:
    namespace: str
    name: str
    uid: str = ""
    #: The Organism was deleted with deletionPolicy Retain: the keys under the prefix are its data.
    retained: bool = False

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def same_organism(self, other: "Owner") -> bool:
        return (self.namespace, self.name) == (other.namespace, other.name)

    def to_json(self) -> str:
        return json.dumps({"namespace": self.namespace, "name": self.name, "uid": self.uid,
                           "retained": self.retained}, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> "Owner":
        data = json.loads(raw)
        return cls(str(data["namespace"]), str(data["name"]), str(data.get("uid", "")),
                   bool(data.get("retained", False)))

    def describe(self) -> str:
        what = f"Organism {self.ref}"
        if self.uid:
            what += f" (uid {self.uid})"
        if self.retained:
            what += ", deleted with deletionPolicy Retain: its data is still there"
        return what


@dataclass(frozen=True)
class Refusal:
    """Why a claim was refused: the condition reason and a message naming the field and the owner."""

    reason: str
    message: str
    prefix: str
    owner: Owner


def owners(admin: redis.Redis) -> dict[str, Owner]:
    """Every recorded prefix and its owner (one HGETALL)."""
    raw: Mapping[Any, Any] = admin.hgetall(OWNERS_KEY)
    return {_s(k): Owner.from_json(v) for k, v in raw.items()}


def owner_of(admin: redis.Redis, prefix: str) -> Owner | None:
    raw = admin.hget(OWNERS_KEY, prefix)
    return Owner.from_json(raw) if raw else None


def find_refusal(prefix: str, owner: Owner, recorded: Mapping[str, Owner]) -> Refusal | None:
    """The refusal of `owner` claiming `prefix` given the `recorded` owners, or None (pure)."""
    held = recorded.get(prefix)
    if held is not None and not held.same_organism(owner):
        return Refusal("PrefixOwned",
                       f"{FIELD}: prefix {prefix!r} belongs to {held.describe()} on the shared Redis; only "
                       f"that Organism (same namespace and name) may use it; choose another prefix", prefix, held)
    for other, held in sorted(recorded.items()):
        if other == prefix or held.same_organism(owner) or not prefixes_overlap(prefix, other):
            continue
        how = "would contain" if other.startswith(prefix) else "lies inside"
        return Refusal("PrefixOverlap",
                       f"{FIELD}: prefix {prefix!r} {how} prefix {other!r} of {held.describe()} on the shared "
                       f"Redis; choose a prefix that neither starts nor is started by another organism's",
                       other, held)
    return None


def claim(admin: redis.Redis, prefix: str, owner: Owner) -> Refusal | None:
    """Record `owner` as the owner of `prefix`, or say why not. Atomic against concurrent claims
    (WATCH on the records). Idempotent: an unchanged record is not rewritten."""
    with admin.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(OWNERS_KEY)
                raw: Mapping[Any, Any] = pipe.hgetall(OWNERS_KEY)
                recorded = {_s(k): Owner.from_json(v) for k, v in raw.items()}
                refusal = find_refusal(prefix, owner, recorded)
                if refusal is not None:
                    pipe.unwatch()
                    return refusal
                if recorded.get(prefix) == owner:
                    pipe.unwatch()
                    return None
                pipe.multi()
                pipe.hset(OWNERS_KEY, prefix, owner.to_json())
                pipe.execute()
                return None
            except redis.WatchError:
                continue


def mark_retained(admin: redis.Redis, prefix: str, owner: Owner) -> bool:
    """Keep the record of a deleted Organism whose data stays. False if it holds no record."""
    held = owner_of(admin, prefix)
    if held is None or not held.same_organism(owner):
        return False
    admin.hset(OWNERS_KEY, prefix, Owner(held.namespace, held.name, held.uid, retained=True).to_json())
    return True


def release(admin: redis.Redis, prefix: str, owner: Owner) -> bool:
    """Forget the record once the prefix's keys are gone. Only the owner's record is removed."""
    held = owner_of(admin, prefix)
    if held is None or not held.same_organism(owner):
        return False
    return int(admin.hdel(OWNERS_KEY, prefix)) > 0


def _s(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)
