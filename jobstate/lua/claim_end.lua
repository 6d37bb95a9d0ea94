-- Claim the job's end for one end task, so that it runs once per round.
-- KEYS: meta, counts, inflight.  ARGV: run id, round, token (the end task's id: a redelivered task
-- keeps it, a second task sent for the same end has its own).
-- Returns 'run', or why not: 'unknown', 'stale' (a retry opened a new round), 'finished', 'not_due',
-- 'claimed' (another task has it).
local meta = redis.call('HMGET', KEYS[1], 'run_id', 'round', 'finished_at', 'end_claim')
if meta[1] ~= ARGV[1] then return 'unknown' end
if tonumber(meta[2] or '0') ~= tonumber(ARGV[2]) then return 'stale' end
if meta[3] then return 'finished' end
if end_due(KEYS[1], KEYS[2], KEYS[3]) == 0 then return 'not_due' end
if meta[4] and meta[4] ~= ARGV[3] then return 'claimed' end
redis.call('HSET', KEYS[1], 'end_claim', ARGV[3])
return 'run'
