-- creditmeter: compare-and-set one account and append its ledger entries, atomically.
-- KEYS[1] account hash (v version, d account JSON, t token of the commit that wrote it)
-- KEYS[2] ledger list   KEYS[3] request-id hash   KEYS[4] the user's lock (a writer's token)
-- KEYS[5] lock queue   KEYS[6] prefix of the queued writers' wake-up lists
-- KEYS[7] prefix of the queued writers' heartbeats   KEYS[8] log stream   KEYS[9] log skew hash
-- KEYS[10] users set, KEYS[11] sorted users: given only on creation
-- ARGV[1] expected version ('' = the account must not exist)   ARGV[2] new version
-- ARGV[3] account JSON   ARGV[4] commit token   ARGV[5] user id
-- ARGV[6] the committer's lock token ('' = none)   ARGV[7] lock lease in ms
-- ARGV[8], ARGV[9], ARGV[10], ...: per entry, a request-id mark ('' or '=' .. id), the entry
-- JSON, and the entry's time in ms since the epoch
-- Returns 0 when written (or already written by this same commit, re-sent),
-- {1[, stored account JSON]} on a lost compare-and-set,
-- {3[, stored account JSON]} while another writer holds the lock (the version still matches),
-- {2, entry number, entry JSON} when an entry's request id was applied before.
-- include: hand_over.lua
-- include: entries.lua

local account = KEYS[1]
local head = redis.call('HMGET', account, 'v', 't')
local stored = head[1]
if stored and head[2] == ARGV[4] then
  return 0
end
local holder = redis.call('GET', KEYS[4])
if holder and holder ~= ARGV[6] then
  -- Held off by the lock's holder: from the version stored, the same commit can be sent
  -- again once the lock is let go (3); from another version it lost (1).
  local code = 1
  if (ARGV[1] == '' and not stored) or (stored and stored == ARGV[1]) then
    code = 3
  end
  if stored then
    return {code, redis.call('HGET', account, 'd')}
  end
  return {code}
end
local seen = {}
for i = 8, #ARGV, 3 do
  local mark = ARGV[i]
  if mark ~= '' then
    local id = string.sub(mark, 2)
    local first = seen[id] or redis.call('HGET', KEYS[3], id)
    if first then
      return {2, (i - 5) / 3, first}
    end
    seen[id] = ARGV[i + 1]
  end
end
local expected = ARGV[1]
if (expected == '' and stored) or (expected ~= '' and stored ~= expected) then
  if stored then
    return {1, redis.call('HGET', account, 'd')}
  end
  return {1}
end
-- Raise WRONGTYPE (if anything else holds these keys) before the first write.
redis.call('LLEN', KEYS[2])
if holder then
  redis.call('LLEN', KEYS[5])
end
local created = #KEYS > 9
if created then
  redis.call('SCARD', KEYS[10])
  redis.call('ZCARD', KEYS[11])
end
local skew = {'0', '0'}
if #ARGV > 7 then
  skew = read_skew(KEYS)
end
redis.call('HSET', account, 'v', ARGV[2], 'd', ARGV[3], 't', ARGV[4])
append_entries(KEYS, ARGV[5], ARGV, 8, skew)
if created then
  redis.call('SADD', KEYS[10], ARGV[5])
  redis.call('ZADD', KEYS[11], 0, ARGV[5])
end
if holder then
  hand_over(KEYS[4], KEYS[5], KEYS[6], KEYS[7], ARGV[7], ARGV[3])
end
return 0
