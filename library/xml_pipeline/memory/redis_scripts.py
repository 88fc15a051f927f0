"""The Lua scripts of the Redis backend: every multi-key write is one atomic server-side step.

A script runs without any other command interleaving, so "read the length, then append" races,
"write, then EXPIRE" gaps and half-updated registry entries cannot happen. The client calls them
with EVALSHA (one round trip) and falls back to EVAL when the server answers NOSCRIPT (after a
restart or SCRIPT FLUSH); EVAL also puts the script back into the server's cache.

Key names follow keys.py. Keys derived inside a script from stored values (the chain key a thread
points to, the stale side of a registry mapping) are built from the prefix passed in ARGV: that is
fine on a single Redis and on a replica set, and is exactly what a Cluster mode would have to split
(see docs/storage.md, "Redis Cluster").
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LuaScript:
    name: str
    numkeys: int
    nargs: int
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


#: Result of APPEND when the thread already holds max_slots slots (nothing was stored).
THREAD_FULL = -1

# KEYS: buffer:{T}, op:{T}, uuid:{T}
# ARGV: slot, append_id, ttl (0 = none), max_slots (0 = none), prefix
# Returns the slot's index, or THREAD_FULL.
#
# Push first, then record the append_id with HSETNX: the common path is two commands. A repeated
# append_id (a retry of an append that was stored) takes its copy back off the tail, which is safe
# because nothing runs between the RPUSH and the RPOP, and answers the first index.
# The registry refresh relies on the invariant REGISTRY_SET keeps: if uuid:{T} holds chain C, then
# chain:C holds T (both written, refreshed and deleted together).
APPEND = LuaScript("append", 3, 5, """
local n = redis.call('RPUSH', KEYS[1], ARGV[1])
if redis.call('HSETNX', KEYS[2], ARGV[2], n - 1) == 0 then
  redis.call('RPOP', KEYS[1])
  return tonumber(redis.call('HGET', KEYS[2], ARGV[2]))
end
local max = tonumber(ARGV[4])
if max > 0 and n > max then
  redis.call('RPOP', KEYS[1])
  redis.call('HDEL', KEYS[2], ARGV[2])
  return -1
end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  local chain = redis.call('GETEX', KEYS[3], 'EX', ttl)  -- read and refresh the reverse entry at once
  if chain then redis.call('EXPIRE', ARGV[5] .. 'chain:' .. chain, ttl) end
end
return n - 1
""")

# Shared by REGISTRY_SET and GET_OR_CREATE.
# KEYS: chain:<C>, uuid:{U};  ARGV: chain, uuid, ttl (0 = none), prefix
_REGISTRY_HEAD = """
local chain, uuid, ttl, P = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local function touch_thread(id)
  if ttl > 0 then
    redis.call('EXPIRE', P .. 'buffer:{' .. id .. '}', ttl)
    redis.call('EXPIRE', P .. 'op:{' .. id .. '}', ttl)
  end
end
local function map()
  local old_uuid = redis.call('GET', KEYS[1])
  if old_uuid and old_uuid ~= uuid then
    local k = P .. 'uuid:{' .. old_uuid .. '}'
    if redis.call('GET', k) == chain then redis.call('DEL', k) end
  end
  local old_chain = redis.call('GET', KEYS[2])
  if old_chain and old_chain ~= chain then
    local k = P .. 'chain:' .. old_chain
    if redis.call('GET', k) == uuid then redis.call('DEL', k) end
  end
  if ttl > 0 then
    redis.call('SET', KEYS[1], uuid, 'EX', ttl)
    redis.call('SET', KEYS[2], chain, 'EX', ttl)
  else
    redis.call('SET', KEYS[1], uuid)
    redis.call('SET', KEYS[2], chain)
  end
  touch_thread(uuid)
end
"""

# Map chain <-> uuid, removing the stale other side of both old mappings.
REGISTRY_SET = LuaScript("registry_set", 2, 4, _REGISTRY_HEAD + """
map()
return 1
""")

# SET NX semantics over both directions: the first caller's uuid wins; later callers get it back
# (and refresh the expiry of the winner's keys, since the chain is in use).
GET_OR_CREATE = LuaScript("registry_get_or_create", 2, 4, _REGISTRY_HEAD + """
local cur = redis.call('GET', KEYS[1])
if cur then
  if ttl > 0 then
    redis.call('EXPIRE', KEYS[1], ttl)
    redis.call('EXPIRE', P .. 'uuid:{' .. cur .. '}', ttl)
    touch_thread(cur)
  end
  return cur
end
map()
return uuid
""")

# KEYS: uuid:{U};  ARGV: uuid, prefix.  Deletes both directions; returns 1 if a mapping existed.
REGISTRY_DELETE = LuaScript("registry_delete", 1, 2, """
local chain = redis.call('GET', KEYS[1])
if not chain then return 0 end
redis.call('DEL', KEYS[1])
local ck = ARGV[2] .. 'chain:' .. chain
if redis.call('GET', ck) == ARGV[1] then redis.call('DEL', ck) end
return 1
""")

ALL: tuple[LuaScript, ...] = (APPEND, REGISTRY_SET, GET_OR_CREATE, REGISTRY_DELETE)
