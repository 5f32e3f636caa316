-- creditmeter: a page of one shard's log on Redis Cluster, after the server's time then.
-- KEYS[1] log stream   ARGV[1] first stream id   ARGV[2] last stream id (both inclusive)
-- ARGV[3] most items to read
-- Returns '<stream id of the time now> ' and then the items as log_page.lua gives them: an
-- item committed after this read gets an id at or above the first.
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local head = string.format('%.0f-%.0f ', ms, (tonumber(now[2]) % 1000) * 1000)
-- include: log_page.lua
