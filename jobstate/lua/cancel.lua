-- Cancel a job: every chunk sent before now is dropped when it starts (a new epoch), and one that
-- runs stops at its next call. KEYS: meta, counts, inflight.  ARGV: now.
-- Returns {'unknown'}, {'finished'} (nothing to cancel), or {'cancelled' or 'already', end due}.
local meta = redis.call('HMGET', KEYS[1], 'total', 'finished_at', 'cancelled_at')
if not meta[1] then return {'unknown'} end
if meta[2] then return {'finished'} end
if meta[3] then return {'already', end_due(KEYS[1], KEYS[2], KEYS[3])} end
redis.call('HSET', KEYS[1], 'cancelled_at', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
return {'cancelled', end_due(KEYS[1], KEYS[2], KEYS[3])}
