-- creditmeter: the stream id of the next log item on Redis Cluster (included by the cluster
-- commit script). From the server's clock in microseconds, so that commits made one after
-- the other on two masters are ordered by their ids: '<ms>-<µs within the ms * 1000>', or
-- the stream's last id plus one when that is not above it.
local function next_id(stream)
  local now = redis.call('TIME')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local seq = (tonumber(now[2]) % 1000) * 1000
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  if last then
    local last_ms, last_seq = string.match(last[1], '^(%d+)-(%d+)$')
    last_ms, last_seq = tonumber(last_ms), tonumber(last_seq)
    if last_ms > ms or (last_ms == ms and last_seq >= seq) then
      ms, seq = last_ms, last_seq + 1
    end
  end
  return string.format('%.0f-%.0f', ms, seq)
end
