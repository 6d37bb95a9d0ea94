-- Workers run the stopped job again: the time it was stopped does not count as its running time.
-- KEYS: meta.  ARGV: now.
-- Returns 1 when the job was stopped.
local meta = redis.call('HMGET', KEYS[1], 'stopped_at', 'started_at')
if not meta[1] then return 0 end
if meta[2] then
  local since = math.max(tonumber(meta[1]), tonumber(meta[2]))
  redis.call('HINCRBYFLOAT', KEYS[1], 'stopped_s', math.max(tonumber(ARGV[1]) - since, 0))
end
redis.call('HDEL', KEYS[1], 'stopped_at')
return 1
