-- Undo a retry that stopped before its chunks were all sent: items not taken by a worker since are
-- failed again (their results in the parts are still there) or, where the job had been cancelled,
-- cancelled again; the stages they had come through are theirs again.
-- KEYS: meta, counts, inflight, done, failed, then handed past stages 0 .. n - 1.
-- ARGV: run id, n, recancel ('1': the job was cancelled and ended before the retry: with the first
-- batch), now, then the n stage counter fields, then position, stages (as reopen_items returned), kind
-- ('f' or 'c') triples. Returns the job's end due (see common.lua): its end must be written again.
if redis.call('HGET', KEYS[1], 'run_id') ~= ARGV[1] then return 0 end
local n = tonumber(ARGV[2])
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'cancelled_at', ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'epoch', 1)
end
local restored = 0
for i = 5 + n, #ARGV, 3 do
  local position, stages, kind = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), ARGV[i + 2]
  if redis.call('GETBIT', KEYS[4], position) == 0 then
    if kind == 'f' then
      redis.call('SETBIT', KEYS[4], position, 1)
      redis.call('SETBIT', KEYS[5], position, 1)
      restored = restored + 1
    end
    for s = 1, n do
      if bit.band(stages, bit.lshift(1, s - 1)) ~= 0 and redis.call('SETBIT', KEYS[5 + s], position, 1) == 0 then
        redis.call('HINCRBY', KEYS[2], ARGV[4 + s], 1)
      end
    end
  end
end
if restored > 0 then
  redis.call('HINCRBY', KEYS[2], 'done', restored)
  redis.call('HINCRBY', KEYS[2], 'failed', restored)
end
return end_due(KEYS[1], KEYS[2], KEYS[3])
