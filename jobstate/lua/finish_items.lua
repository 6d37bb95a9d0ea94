-- Items finished: their results are in a results part already. Marks each done (and failed), once.
-- KEYS: meta, counts, inflight, done, failed.
-- ARGV: run id, epoch, chunk id, stage counter field, now, then position, 's' or 'f' pairs.
-- Returns {standing, 1 or 0 per item}: 1 where this call finished the item. standing is 'open',
-- 'stopped' (cancelled since the chunk was sent: it should stop) or 'unknown' (pruned: nothing moved).
local meta = redis.call('HMGET', KEYS[1], 'run_id', 'epoch', 'cancelled_at')
if meta[1] ~= ARGV[1] then return {'unknown'} end
local standing = 'open'
if tonumber(meta[2] or '0') ~= tonumber(ARGV[2]) or meta[3] then standing = 'stopped' end
local reply, moved, failed = {standing}, 0, 0
for i = 6, #ARGV, 2 do
  local position = tonumber(ARGV[i])
  if redis.call('SETBIT', KEYS[4], position, 1) == 0 then
    moved = moved + 1
    if ARGV[i + 1] == 'f' then
      redis.call('SETBIT', KEYS[5], position, 1)
      failed = failed + 1
    end
    reply[#reply + 1] = 1
  else
    reply[#reply + 1] = 0
  end
end
if moved > 0 then
  redis.call('HSET', KEYS[1], 'touched_at', ARGV[5])
  redis.call('HINCRBY', KEYS[2], 'done', moved)
  if failed > 0 then redis.call('HINCRBY', KEYS[2], 'failed', failed) end
  if moved > failed then redis.call('HINCRBY', KEYS[2], ARGV[4], moved - failed) end
  if redis.call('HEXISTS', KEYS[3], ARGV[3]) == 1 then redis.call('HINCRBY', KEYS[3], ARGV[3], -moved) end
end
return reply
