-- The session store's operations, each run whole inside Redis (one script call is atomic), so that every
-- gateway process sees one store and no session is ever left half written. sessions_redis.py prepends
-- the operation's own body after these helpers.
--
-- ARGV[1] key prefix, ARGV[2] now (the caller's wall clock, seconds), ARGV[3] ttl (seconds),
-- ARGV[4..7] max sessions per model, max bytes per model, sessions per owner, bytes per owner,
-- ARGV[8] bookkeeping bytes per session, ARGV[9] the longest a lease is held (seconds); the operation's own
-- arguments follow from ARGV[10].
-- A member is "<owner>/<id>": an owner is hex (or empty), so the first "/" splits it.
local P = ARGV[1]
local now, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
local max_sessions, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
local owner_sessions, owner_bytes = tonumber(ARGV[6]), tonumber(ARGV[7])
local overhead, lease_s = tonumber(ARGV[8]), tonumber(ARGV[9])
local evictions = {}  -- model, reason pairs, for the caller's counter
local touched = {}  -- models whose totals changed, for the caller's gauges

local function skey(member) return P .. 's/' .. member end
local function owner_of(member) return string.sub(member, 1, string.find(member, '/', 1, true) - 1) end
local function gkey(owner, model) return P .. 'g/' .. owner .. '/' .. model end
local function mkey(model) return P .. 'm/' .. model end
local function okey(owner) return P .. 'o/' .. owner end
local function ckey(model) return P .. 'c/' .. model end  -- hash: count, bytes
local function gbkey(owner, model) return P .. 'gb/' .. owner .. '/' .. model end

-- a lease held longer than lease_s belongs to a request that could not end it (its process died)
local function busy(k)
  local h = redis.call('HMGET', k, 'lease', 'leased_at')
  return h[1] and h[1] ~= '' and tonumber(h[2]) > now - lease_s
end

-- 'all' orders by time of last use, for expiry; the others by a counter of uses, for least recently used
-- first (times can tie)
local function use(member, owner, model)
  local seq = redis.call('INCR', P .. 'seq')
  redis.call('ZADD', P .. 'all', now, member)
  redis.call('ZADD', mkey(model), seq, member)
  redis.call('ZADD', gkey(owner, model), seq, member)
  redis.call('ZADD', okey(owner), seq, member)
end

local function add(member, owner, model, id, state, tokens)
  local nb = overhead + #id + (state and #state or 0)
  local k = skey(member)
  redis.call('HSET', k, 'model', model, 'id', id, 'tokens', tokens, 'nbytes', nb, 'created', now, 'used', now,
             'lease', '', 'leased_at', 0, 'has_state', state and 1 or 0)
  if state then redis.call('HSET', k, 'state', state) end
  redis.call('HINCRBY', ckey(model), 'count', 1)
  redis.call('HINCRBY', ckey(model), 'bytes', nb)
  redis.call('INCRBY', gbkey(owner, model), nb)
  use(member, owner, model)
  touched[model] = true
end

local function remove(member, reason)
  local k = skey(member)
  local h = redis.call('HMGET', k, 'model', 'nbytes', 'has_state')
  if not h[1] then return end
  local model, nb, owner = h[1], tonumber(h[2]), owner_of(member)
  redis.call('DEL', k)
  redis.call('ZREM', P .. 'all', member)
  redis.call('ZREM', mkey(model), member)
  redis.call('ZREM', gkey(owner, model), member)
  redis.call('ZREM', okey(owner), member)
  redis.call('HINCRBY', ckey(model), 'count', -1)
  redis.call('HINCRBY', ckey(model), 'bytes', -nb)
  if redis.call('DECRBY', gbkey(owner, model), nb) <= 0 then redis.call('DEL', gbkey(owner, model)) end
  if reason and h[3] == '1' then
    table.insert(evictions, model)
    table.insert(evictions, reason)
  end
  touched[model] = true
end

-- the least recently used idle member of a sorted set, or nil
local function oldest_idle(zkey)
  local start = 0
  while true do
    local members = redis.call('ZRANGE', zkey, start, start + 63)
    if #members == 0 then return nil end
    for _, m in ipairs(members) do
      if not busy(skey(m)) then return m end
    end
    start = start + 64
  end
end

local function expire()
  local stale = redis.call('ZRANGEBYSCORE', P .. 'all', '-inf', now - ttl, 'LIMIT', 0, 256)
  for _, m in ipairs(stale) do
    if not busy(skey(m)) then remove(m, 'expired') end
  end
end

-- room for one more of the owner's sessions of the model: its own least recently used idle ones go first
local function make_room(owner, model)
  while redis.call('ZCARD', gkey(owner, model)) + 1 > owner_sessions do
    local m = oldest_idle(gkey(owner, model))
    if not m then return false end
    remove(m, 'capacity')
  end
  return true
end

local function group_bytes(owner, model) return tonumber(redis.call('GET', gbkey(owner, model)) or 0) end
local function model_total(model, field) return tonumber(redis.call('HGET', ckey(model), field) or 0) end

local function bound(owner, model)
  while redis.call('ZCARD', gkey(owner, model)) > owner_sessions or group_bytes(owner, model) > owner_bytes do
    local m = oldest_idle(gkey(owner, model))
    if not m then break end
    remove(m, 'capacity')
  end
  while model_total(model, 'count') > max_sessions or model_total(model, 'bytes') > max_bytes do
    local m = oldest_idle(mkey(model))
    if not m then break end
    remove(m, 'capacity')
  end
end

-- what every operation answers: {status, value, evictions, totals of the models it changed}
local function answer(status, value)
  local totals = {}
  for model, _ in pairs(touched) do
    table.insert(totals, model)
    table.insert(totals, model_total(model, 'count'))
    table.insert(totals, model_total(model, 'bytes'))
  end
  return {status, value or '', evictions, totals}
end

local function info(member)
  return redis.call('HMGET', skey(member), 'id', 'model', 'tokens', 'nbytes', 'created', 'used')
end

local function exists_with_state(member)
  return redis.call('HGET', skey(member), 'has_state') == '1'
end
