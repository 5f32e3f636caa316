-- Appending a commit's ledger entries: each to the user's ledger, to the request-id hash
-- when it has a request id, and to the log of every entry (commit order) with its user
-- and ledger index. commit.lua and delta.lua include it; these lines are not sent.
-- KEYS as in commit.lua: [2] ledger, [3] request-id hash, [8] log stream, [9] log skew hash.

-- Before the first write: raise WRONGTYPE if anything else holds the log's keys, and read
-- the skew kept so far.
local function read_skew(keys)
  redis.call('XLEN', keys[8])
  return redis.call('HMGET', keys[9], 'ahead', 'behind')
end

-- args[first], args[first + 1], args[first + 2], ...: per entry, a request-id mark ('' or
-- '=' .. id), the entry JSON, and the entry's time in ms since the epoch. The skew kept is
-- the most an entry's time (the writer's clock) was ahead of, or behind, its stream id's
-- (the server's): readers widen a time range by it.
local function append_entries(keys, user, args, first, skew)
  local ahead = tonumber(skew[1]) or 0
  local behind = tonumber(skew[2]) or 0
  local skewed = not skew[1]  -- the first entry logged writes it
  for i = first, #args, 3 do
    local mark = args[i]
    local length = redis.call('RPUSH', keys[2], args[i + 1])
    if mark ~= '' then
      redis.call('HSET', keys[3], string.sub(mark, 2), args[i + 1])
    end
    local id = redis.call('XADD', keys[8], '*', 'u', user, 'i', string.format('%d', length - 1))
    local gap = tonumber(args[i + 2]) - tonumber(string.match(id, '^%d+'))
    if gap > ahead then
      ahead = gap
      skewed = true
    elseif -gap > behind then
      behind = -gap
      skewed = true
    end
  end
  if skewed then
    redis.call('HSET', keys[9], 'ahead', string.format('%.0f', ahead),
      'behind', string.format('%.0f', behind))
  end
end
