-- creditmeter: a queued writer that waited a while looks again: was the lock handed to it,
-- or did its holder vanish (the lease ran out)? Then it is the writer's. Else it renews
-- its heartbeat; if that had lapsed (the writer stalled), a handover may have dropped it
-- from the queue, and it queues again.
-- KEYS[1] lock   KEYS[2] lock queue   KEYS[3] account hash   KEYS[4] writer's wake-up list
-- KEYS[5] writer's heartbeat   ARGV[1] writer's token   ARGV[2] lease in ms
-- ARGV[3] heartbeat lifetime in ms
-- Returns {1[, account JSON]} when the lock is the writer's, {0} to wait on.
local holder = redis.call('GET', KEYS[1])
if holder ~= ARGV[1] then
  if holder then
    if not redis.call('SET', KEYS[5], '1', 'PX', ARGV[3], 'XX') then
      redis.call('SET', KEYS[5], '1', 'PX', ARGV[3])
      local queued = false
      for _, token in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
        if token == ARGV[1] then
          queued = true
          break
        end
      end
      if not queued then
        redis.call('RPUSH', KEYS[2], ARGV[1])
      end
    end
    return {0}
  end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('LREM', KEYS[2], 0, ARGV[1])
end
redis.call('DEL', KEYS[4], KEYS[5])
local data = redis.call('HGET', KEYS[3], 'd')
if data then
  return {1, data}
end
return {1}
