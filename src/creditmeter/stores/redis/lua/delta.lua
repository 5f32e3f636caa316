-- creditmeter: add a charge to whatever balance is stored, if guarded (DeltaStore), and
-- append its ledger entry, atomically.
-- KEYS as commit.lua's first nine (the account exists, so no users keys).
-- ARGV[1..4] the planned account's JSON, cut around its balance, version and updated_at
-- (a .. balance .. b .. version .. c .. updated_at .. d)   ARGV[5] its updated_at
-- ARGV[6] the amount   ARGV[7] the floor ('' = any balance)   ARGV[8] commit token
-- ARGV[9] user id   ARGV[10] the committer's lock token ('' = none)   ARGV[11] lock lease
-- ARGV[12] the entry's request-id mark ('' or '=' .. id)   ARGV[13], ARGV[14] the entry's
-- JSON cut around its balance_after   ARGV[15] the entry's time in ms since the epoch
-- The guard: the stored account's JSON is the planned one's but for those three values,
-- and its balance is at least the floor. Returns {0, balance, version, updated_at} as
-- written (also when this same commit is sent again), {1[, stored account JSON]} when the
-- guard fails, {3, stored account JSON} while another writer holds the lock, and
-- {2, 1, entry JSON} when the guard holds but the request id was applied before.
-- include: hand_over.lua
-- include: entries.lua
-- include: decimal.lua

-- The balance, version and updated_at of an account's JSON, if the rest of it is a..b..c..d.
local function cut(text)
  local a, b, c, d = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
  if string.sub(text, 1, #a) ~= a then
    return nil
  end
  local balance_end = string.find(text, '"', #a + 1, true)
  if not balance_end or string.sub(text, balance_end, balance_end + #b - 1) ~= b then
    return nil
  end
  local version_end = string.find(text, ',', balance_end + #b, true)
  if not version_end or string.sub(text, version_end, version_end + #c - 1) ~= c then
    return nil
  end
  local updated_end = string.find(text, '"', version_end + #c, true)
  if not updated_end or string.sub(text, updated_end) ~= d then
    return nil
  end
  return string.sub(text, #a + 1, balance_end - 1),
    string.sub(text, balance_end + #b, version_end - 1),
    string.sub(text, version_end + #c, updated_end - 1)
end

-- An ISO-8601 UTC time ('2026-12-05T10:00:00[.123456]+00:00') as text that sorts in time.
local function sortable(time)
  return string.sub(time, 1, 19) .. (string.match(time, '^.-%.(%d+)') or '000000')
end

local account = KEYS[1]
local head = redis.call('HMGET', account, 'v', 't', 'd')
local stored = head[3]
if not stored then
  return {1}
end
local balance, version, updated = cut(stored)
if head[2] == ARGV[8] and balance then
  return {0, balance, version, updated}
end
local holder = redis.call('GET', KEYS[4])
if holder and holder ~= ARGV[10] then
  return {3, stored}
end
local now = balance and parse_decimal(balance)
local amount = parse_decimal(ARGV[6])
if not now or not amount or version ~= head[1] or not string.match(version, '^%d+$') then
  return {1, stored}
end
if ARGV[7] ~= '' then
  local floor = parse_decimal(ARGV[7])
  if not floor or not at_least(now, floor) then
    return {1, stored}
  end
end
local mark = ARGV[12]
if mark ~= '' then
  local first = redis.call('HGET', KEYS[3], string.sub(mark, 2))
  if first then
    return {2, 1, first}
  end
end
balance = decimal_text(add_decimal(now, amount))
version = string.format('%d', tonumber(version) + 1)
if sortable(ARGV[5]) > sortable(updated) then
  updated = ARGV[5]
end
local data = ARGV[1] .. balance .. ARGV[2] .. version .. ARGV[3] .. updated .. ARGV[4]
-- Raise WRONGTYPE (if anything else holds these keys) before the first write.
redis.call('LLEN', KEYS[2])
if holder then
  redis.call('LLEN', KEYS[5])
end
local skew = read_skew(KEYS)
redis.call('HSET', account, 'v', version, 'd', data, 't', ARGV[8])
append_entries(KEYS, ARGV[9], {mark, ARGV[13] .. balance .. ARGV[14], ARGV[15]}, 1, skew)
if holder then
  hand_over(KEYS[4], KEYS[5], KEYS[6], KEYS[7], ARGV[11], data)
end
return {0, balance, version, updated}
