-- creditmeter: read a page of the log of every entry, as one string that is quick to parse
-- (redis-py parses a long XRANGE reply in pure Python, item by item; this is one bulk string).
-- KEYS[1] log stream   ARGV[1] first stream id   ARGV[2] last stream id (both inclusive)
-- ARGV[3] most items to read
-- Returns, per item, '<stream id> <ledger index> <bytes of the user id> <user id> ' ('' for
-- none); '?' stands for the index of an item that lacks a field.
local items = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', ARGV[3])
local out = {}
for n, item in ipairs(items) do
  local fields = item[2]
  local user, index = nil, nil
  for k = 1, #fields, 2 do
    if fields[k] == 'u' then
      user = fields[k + 1]
    elseif fields[k] == 'i' then
      index = fields[k + 1]
    end
  end
  if not user or not index then
    user, index = '', '?'
  end
  out[n] = item[1] .. ' ' .. index .. ' ' .. #user .. ' ' .. user .. ' '
end
return table.concat(out)
