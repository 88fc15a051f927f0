"""The Lua scripts of the Redis Cluster mode: each touches the keys of one slot, all named in KEYS.

On a cluster a script may only touch keys of the slot it was routed to, and every key it touches
must be declared in KEYS. The standalone scripts (redis_scripts.py) update a thread, its registry
entry, the chain key and the index in one step; here that step is split by slot, and the client
(memory/redis_cluster.py) runs the pieces in an order that keeps the guarantees (docs/storage.md,
"Redis Cluster"):

- a thread's own keys (buffer:{T}, op:{T}, uuid:{T}) still change together: the compare-and-append,
  the append-id record, max_slots and the TTL of the thread are one atomic step (C_APPEND);
- the chain key chain:{C} is the authority of the registry: it is written first, alone in its
  slot (SET, or SET NX for get_or_create), and the reverse entry uuid:{U} after it; a reader of the
  reverse direction checks it against the chain key (read repair);
- index entries live in N bucket SETs of their own slots, added after (threads) or before
  (chains, via the client) the keys they list, and checked against those keys when listed.
"""
from __future__ import annotations

from .redis_scripts import LuaScript

#: First element of C_APPEND's reply.
STORED, MOVED, REPEAT, FULL = 0, 1, 2, 3

# KEYS: buffer:{T}, op:{T}, uuid:{T}
# ARGV: slot, append_id, ttl (0 = none), max_slots (0 = none), expected index (-1 = none)
# Returns {STORED, index, new thread 0|1, chain of the thread or ''}, {MOVED, length},
# {REPEAT, index, stored slot} or {FULL, 0}. The same steps as redis_scripts.APPEND without the
# index and the chain key, which live in other slots: the client refreshes those.
C_APPEND = LuaScript("cluster_append", 3, 5, "redis.replicate_commands()\n" + """
local n = redis.call('RPUSH', KEYS[1], ARGV[1])
local expected = tonumber(ARGV[5])
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
  return {3, 0}
end
local ttl = tonumber(ARGV[3])
local chain
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  chain = redis.call('GETEX', KEYS[3], 'EX', ttl)
else
  chain = redis.call('GET', KEYS[3])
end
return {0, n - 1, n == 1 and 1 or 0, chain or ''}
""")

# KEYS: chain:{C};  ARGV: uuid, ttl in ms (0 = none), nx (1 = only if absent)
# Returns {1, uuid} when this call wrote the mapping; {0, current uuid} when nx found one (its
# expiry refreshed). Without nx: {1, previous uuid or ''}.
C_CHAIN_SET = LuaScript("cluster_chain_set", 1, 3, """
local cur = redis.call('GET', KEYS[1])
local ttl = tonumber(ARGV[2])
if ARGV[3] == '1' and cur then
  if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
  return {0, cur}
end
if ttl > 0 then redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl) else redis.call('SET', KEYS[1], ARGV[1]) end
return {1, cur or ''}
""")

# KEYS: uuid:{U}, buffer:{U}, op:{U};  ARGV: chain, ttl in s (0 = none), only_if_missing (1|0)
# Writes the reverse entry (unless only_if_missing and one exists) and refreshes the thread's
# expiry, as a registry write does. Returns the chain the entry held before ('' if none).
C_UUID_SET = LuaScript("cluster_uuid_set", 3, 3, """
local old = redis.call('GET', KEYS[1])
local ttl = tonumber(ARGV[2])
if not (ARGV[3] == '1' and old) then
  if ttl > 0 then redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl) else redis.call('SET', KEYS[1], ARGV[1]) end
elseif ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
end
if ttl > 0 then
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
end
return old or ''
""")

# KEYS: key;  ARGV: value.  Deletes the key only if it holds `value` (a stale registry side may be
# removed, a mapping somebody else wrote meanwhile may not). Returns 1 if deleted.
C_DEL_IF = LuaScript("cluster_del_if", 1, 1, """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")

# KEYS: uuid:{U};  Deletes the reverse entry and returns the chain it held ('' if none).
C_UUID_TAKE = LuaScript("cluster_uuid_take", 1, 0, """
local chain = redis.call('GET', KEYS[1])
if not chain then return '' end
redis.call('DEL', KEYS[1])
return chain
""")

ALL: tuple[LuaScript, ...] = (C_APPEND, C_CHAIN_SET, C_UUID_SET, C_DEL_IF, C_UUID_TAKE)
