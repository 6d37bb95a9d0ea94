-- Shared by the scripts below (prepended to each by jobstate/store.py).

-- Bit `index` of a string read from a bitmap (bit 0 is the first byte's most significant bit, as
-- SETBIT numbers them).
local function bit_at(bytes, index)
  local byte = string.byte(bytes, math.floor(index / 8) + 1) or 0
  return bit.band(byte, bit.lshift(1, 7 - index % 8)) ~= 0
end

-- 0 while the job's end is not due; else its round + 1. Due once no chunk of the job is running and
-- every item is finished, or the job is cancelled; never again once finished.
local function end_due(meta_key, counts_key, inflight_key)
  local meta = redis.call('HMGET', meta_key, 'total', 'finished_at', 'cancelled_at', 'round')
  if not meta[1] or meta[2] then return 0 end
  if redis.call('HLEN', inflight_key) > 0 then return 0 end
  local done = tonumber(redis.call('HGET', counts_key, 'done') or '0')
  if meta[3] or done >= tonumber(meta[1]) then return tonumber(meta[4] or '0') + 1 end
  return 0
end
