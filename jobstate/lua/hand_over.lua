-- Items handed to the next stage: its input is written and its chunk is queued.
-- KEYS: meta, counts, inflight, handed (past this stage).  ARGV: run id, chunk id, stage counter
-- field, then positions.  Returns how many were not handed over before (-1: another run, or pruned).
if redis.call('HGET', KEYS[1], 'run_id') ~= ARGV[1] then return -1 end
local moved = 0
for i = 4, #ARGV do
  if redis.call('SETBIT', KEYS[4], tonumber(ARGV[i]), 1) == 0 then moved = moved + 1 end
end
if moved > 0 then
  redis.call('HINCRBY', KEYS[2], ARGV[3], moved)
  if redis.call('HEXISTS', KEYS[3], ARGV[2]) == 1 then redis.call('HINCRBY', KEYS[3], ARGV[2], -moved) end
end
return moved
