-- A chunk starts: decide whether it runs, count the delivery, and register the items it will run.
-- KEYS: meta, counts, inflight, deliveries, done, handed (past this chunk's stage).
-- ARGV: chunk id, delivery field, run id, epoch, now, first position, slot count, slot mask (the
--       slots of the part this chunk covers, a bit each as in a bitmap; '' = every slot).
-- Returns {'unknown'} (another run of the job id, or none: pruned), {'dropped', end due} (sent before a
-- cancel; end due is set for one dropped chunk per round), or {'run', delivery, slot...}: the slots
-- neither finished nor handed past this stage.
local meta = redis.call('HMGET', KEYS[1], 'run_id', 'epoch', 'cancelled_at')
if meta[1] ~= ARGV[3] then return {'unknown'} end
if tonumber(meta[2] or '0') ~= tonumber(ARGV[4]) or meta[3] then
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('HDEL', KEYS[4], ARGV[2])
  -- Every chunk a cancel left queued comes this way: only the first to find the end due sends it
  -- (end_sent: the round whose end a dropped chunk sent).
  local due = end_due(KEYS[1], KEYS[2], KEYS[3])
  if due > 0 then
    if tonumber(redis.call('HGET', KEYS[1], 'end_sent') or '-1') == due - 1 then
      due = 0
    else
      redis.call('HSET', KEYS[1], 'end_sent', due - 1)
    end
  end
  return {'dropped', due}
end
local delivery = redis.call('HINCRBY', KEYS[4], ARGV[2], 1)
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[5])
redis.call('HSET', KEYS[1], 'touched_at', ARGV[5])
local first, count, mask = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
local base = math.floor(first / 8)
local last = math.floor((first + count - 1) / 8)
local done = redis.call('GETRANGE', KEYS[5], base, last)
local handed = redis.call('GETRANGE', KEYS[6], base, last)
local shift = first - base * 8
local reply = {'run', delivery}
for slot = 0, count - 1 do
  if (mask == '' or bit_at(mask, slot)) and not bit_at(done, shift + slot) and not bit_at(handed, shift + slot) then
    reply[#reply + 1] = slot
  end
end
if #reply > 2 then redis.call('HSET', KEYS[3], ARGV[1], #reply - 2) else redis.call('HDEL', KEYS[3], ARGV[1]) end
return reply
