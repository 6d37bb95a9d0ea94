-- The job's end is written (or failed for good): the job is finished.
-- KEYS: meta.  ARGV: run id, round, token, now, results URI, report URI, error ('' for none).
-- Returns 1, or 0 when the claim is not this task's or a retry opened a new round meanwhile.
local meta = redis.call('HMGET', KEYS[1], 'run_id', 'round', 'end_claim')
if meta[1] ~= ARGV[1] or tonumber(meta[2] or '0') ~= tonumber(ARGV[2]) or meta[3] ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'finished_at', ARGV[4])
redis.call('HDEL', KEYS[1], 'end_retrying')
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'results', ARGV[5], 'report', ARGV[6]) end
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'end_error', ARGV[7]) end
return 1
