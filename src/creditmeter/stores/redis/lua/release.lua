-- creditmeter: leave a user's lock (or its queue): pass it on if it is the writer's.
-- KEYS[1] lock   KEYS[2] lock queue   KEYS[3] account hash   KEYS[4] wake-up list prefix
-- KEYS[5] writer's wake-up list   KEYS[6] heartbeat prefix   KEYS[7] writer's heartbeat
-- ARGV[1] writer's token   ARGV[2] lease in ms
-- include: hand_over.lua

redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('DEL', KEYS[5], KEYS[7])
if redis.call('GET', KEYS[1]) == ARGV[1] then
  hand_over(KEYS[1], KEYS[2], KEYS[4], KEYS[6], ARGV[2], redis.call('HGET', KEYS[3], 'd') or '')
end
return 0
