-- creditmeter: take a user's lock, or queue for it (with a heartbeat that the wait renews).
-- KEYS[1] lock   KEYS[2] lock queue   KEYS[3] account hash   KEYS[4] writer's heartbeat
-- ARGV[1] writer's token   ARGV[2] lease in ms   ARGV[3] heartbeat lifetime in ms
-- Returns {1[, account JSON]} when taken, {0} when queued.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local data = redis.call('HGET', KEYS[3], 'd')
  if data then
    return {1, data}
  end
  return {1}
end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('SET', KEYS[4], '1', 'PX', ARGV[3])
return {0}
