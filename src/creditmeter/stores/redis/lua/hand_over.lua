-- The end of a writer's turn: pass the user's lock to the next writer queued for it
-- (FIFO), or free it. The next writer is sent the account as it now stands, so it
-- need not read it. A queued writer whose heartbeat has lapsed (killed, or stalled
-- for a lease) is dropped from the queue instead of being handed a lock it would
-- keep for a lease. commit.lua and release.lua include it; these lines are not sent.
local function hand_over(lock, queue, wake_prefix, alive_prefix, lease, data)
  while true do
    local next_token = redis.call('LPOP', queue)
    if not next_token then
      redis.call('DEL', lock)
      return
    end
    if redis.call('DEL', alive_prefix .. next_token) == 1 then
      redis.call('SET', lock, next_token, 'PX', lease)
      local wake = wake_prefix .. next_token
      redis.call('RPUSH', wake, data)
      redis.call('PEXPIRE', wake, lease * 2)
      return
    end
  end
end
