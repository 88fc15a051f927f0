"""The Lua scripts of the Redis backend: every multi-key write is one atomic server-side step.

A script runs without any other command interleaving, so "read the length, then append" races,
"write, then EXPIRE" gaps and half-updated registry entries cannot happen. The client calls them
with EVALSHA (one round trip) and falls back to EVAL when the server answers NOSCRIPT (after a
restart or SCRIPT FLUSH); EVAL also puts the script back into the server's cache.

Key names follow keys.py. Keys derived inside a script from stored values (the chain key a thread
points to, the stale side of a registry mapping) are built from the prefix passed in ARGV: that is
fine on a single Redis and on a replica set, and is exactly what a Cluster mode would have to split
(see docs/storage.md, "Redis Cluster").

The thread index (`meta:index`, a SET of `t:<thread id>` and `c:<chain>` entries) lets the library
list and clear a tenant's threads without SCAN, which Redis ACLs cannot confine to a prefix. The
scripts that create a thread or a chain mapping add its entry, the ones that delete one remove it,
and every expiry refresh of a thread's keys refreshes the index's expiry too, so the index outlives
every thread it lists. Entries of threads that expired are removed lazily: each new entry samples
two others and drops those whose key is gone (the index stays within about twice its live size),
and listing drops the ones it finds dead (INDEX_LIVE).
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
#: First element of APPEND's array replies: the thread's length is not the expected index / the
#: append_id was recorded already (nothing was stored in either case).
MOVED = 1
REPEAT = 2

# Shared by every script that adds an index entry. ARGV-independent: P (the prefix) and the index
# key are passed in. Effects replication (the default since Redis 7) makes SRANDMEMBER followed by
# writes legal; on 6.2 replicate_commands() switches it on (a no-op on 7).
_INDEX = """
local function entry_key(P, m)
  if string.sub(m, 1, 2) == 't:' then return P .. 'buffer:{' .. string.sub(m, 3) .. '}' end
  return P .. 'chain:' .. string.sub(m, 3)
end
local function index_add(P, idx, m)
  if redis.call('SADD', idx, m) == 1 then
    for _, other in ipairs(redis.call('SRANDMEMBER', idx, 2)) do
      if redis.call('EXISTS', entry_key(P, other)) == 0 then redis.call('SREM', idx, other) end
    end
  end
end
"""

# KEYS: buffer:{T}, op:{T}, uuid:{T}, meta:index
# ARGV: slot, append_id, ttl (0 = none), max_slots (0 = none), prefix, expected index (-1 = none)
# Returns the slot's index when it was stored, THREAD_FULL, {MOVED, length} when the thread does not
# hold `expected index` slots, or {REPEAT, index, stored slot} when the append_id was recorded.
#
# Push first, then record the append_id with HSETNX: the common path is two commands. Any other
# outcome takes the pushed copy back off the tail, which is safe because nothing runs between the
# RPUSH and the RPOP. The expected index is the compare of a compare-and-append: the client signed
# the slot for that position (signing.py), so it may only land there. A recorded append_id answers
# with the slot it stored, and the client decides whether this is really the same append.
# The registry refresh relies on the invariant REGISTRY_SET keeps: if uuid:{T} holds chain C, then
# chain:C holds T (both written, refreshed and deleted together).
APPEND = LuaScript("append", 4, 6, "redis.replicate_commands()" + _INDEX + """
local n = redis.call('RPUSH', KEYS[1], ARGV[1])
local expected = tonumber(ARGV[6])
if (expected >= 0 and n - 1 ~= expected) or redis.call('HSETNX', KEYS[2], ARGV[2], n - 1) == 0 then
  redis.call('RPOP', KEYS[1])
  local done = redis.call('HGET', KEYS[2], ARGV[2])
  if done then
    local at = tonumber(done)
    return {2, at, redis.call('LINDEX', KEYS[1], at)}
  end
  return {1, n - 1}
end
local max = tonumber(ARGV[4])
if max > 0 and n > max then
  redis.call('RPOP', KEYS[1])
  redis.call('HDEL', KEYS[2], ARGV[2])
  return -1
end
if n == 1 then  -- a new thread: its id is the text between the braces of KEYS[1]
  index_add(ARGV[5], KEYS[4], 't:' .. string.sub(KEYS[1], #ARGV[5] + 9, -2))
end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[4], ttl)
  local chain = redis.call('GETEX', KEYS[3], 'EX', ttl)  -- read and refresh the reverse entry at once
  if chain then redis.call('EXPIRE', ARGV[5] .. 'chain:' .. chain, ttl) end
end
return n - 1
""")

# Shared by REGISTRY_SET and GET_OR_CREATE.
# KEYS: chain:<C>, uuid:{U}, meta:index;  ARGV: chain, uuid, ttl (0 = none), prefix
_REGISTRY_HEAD = "redis.replicate_commands()" + _INDEX + """
local chain, uuid, ttl, P = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local function touch_thread(id)
  if ttl > 0 then
    redis.call('EXPIRE', P .. 'buffer:{' .. id .. '}', ttl)
    redis.call('EXPIRE', P .. 'op:{' .. id .. '}', ttl)
    redis.call('EXPIRE', KEYS[3], ttl)
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
    if redis.call('GET', k) == uuid then
      redis.call('DEL', k)
      redis.call('SREM', KEYS[3], 'c:' .. old_chain)
    end
  end
  if ttl > 0 then
    redis.call('SET', KEYS[1], uuid, 'EX', ttl)
    redis.call('SET', KEYS[2], chain, 'EX', ttl)
  else
    redis.call('SET', KEYS[1], uuid)
    redis.call('SET', KEYS[2], chain)
  end
  index_add(P, KEYS[3], 'c:' .. chain)
  touch_thread(uuid)
end
"""

# Map chain <-> uuid, removing the stale other side of both old mappings.
REGISTRY_SET = LuaScript("registry_set", 3, 4, _REGISTRY_HEAD + """
map()
return 1
""")

# SET NX semantics over both directions: the first caller's uuid wins; later callers get it back
# (and refresh the expiry of the winner's keys, since the chain is in use).
GET_OR_CREATE = LuaScript("registry_get_or_create", 3, 4, _REGISTRY_HEAD + """
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

# KEYS: uuid:{U}, meta:index;  ARGV: uuid, prefix.  Deletes both directions and the chain's index
# entry; returns 1 if a mapping existed.
REGISTRY_DELETE = LuaScript("registry_delete", 2, 2, """
local chain = redis.call('GET', KEYS[1])
if not chain then return 0 end
redis.call('DEL', KEYS[1])
local ck = ARGV[2] .. 'chain:' .. chain
if redis.call('GET', ck) == ARGV[1] then
  redis.call('DEL', ck)
  redis.call('SREM', KEYS[2], 'c:' .. chain)
end
return 1
""")

# KEYS: buffer:{T}, op:{T}, meta:index;  ARGV: thread id.  One step, so an append that creates the
# thread again right after cannot lose its index entry. Returns 1 if the thread existed.
DELETE_THREAD = LuaScript("delete_thread", 3, 1, """
local n = redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], 't:' .. ARGV[1])
return math.min(n, 1)
""")

# KEYS: meta:index;  ARGV: prefix, then index entries.  Returns the live entries, and for chains
# the uuid each maps to ({entry, uuid, entry, uuid, ...}; {entry, 1, ...} for threads). Entries
# whose key is gone (the thread or mapping expired) are removed from the index in the same step,
# so a thread created again concurrently keeps the entry its append adds.
INDEX_LIVE = LuaScript("index_live", 1, -1, _INDEX + """
local P, out = ARGV[1], {}
for i = 2, #ARGV do
  local m = ARGV[i]
  local k = entry_key(P, m)
  local v
  if string.sub(m, 1, 2) == 't:' then v = redis.call('EXISTS', k) else v = redis.call('GET', k) end
  if v == 0 or not v then
    redis.call('SREM', KEYS[1], m)
  else
    out[#out + 1] = m
    out[#out + 1] = v
  end
end
return out
""")

# KEYS: meta:index;  ARGV: prefix, then index entries.  Deletes the entries' keys (a thread's
# buffer and append ids; a chain's both directions) and the entries. Returns how many of the
# entries still had their key (threads or mappings removed).
INDEX_CLEAR = LuaScript("index_clear", 1, -1, """
local P, removed = ARGV[1], 0
for i = 2, #ARGV do
  local m = ARGV[i]
  local id = string.sub(m, 3)
  if string.sub(m, 1, 2) == 't:' then
    removed = removed + math.min(redis.call('UNLINK', P .. 'buffer:{' .. id .. '}', P .. 'op:{' .. id .. '}'), 1)
  else
    local ck = P .. 'chain:' .. id
    local u = redis.call('GET', ck)
    if u then
      local uk = P .. 'uuid:{' .. u .. '}'
      if redis.call('GET', uk) == id then redis.call('UNLINK', uk) end
      removed = removed + redis.call('UNLINK', ck)
    end
  end
  redis.call('SREM', KEYS[1], m)
end
return removed
""")

ALL: tuple[LuaScript, ...] = (APPEND, REGISTRY_SET, GET_OR_CREATE, REGISTRY_DELETE, DELETE_THREAD, INDEX_LIVE,
                              INDEX_CLEAR)
