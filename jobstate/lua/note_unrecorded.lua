-- Why results of failed items could not be written (storage full or away): the job's end tells them
-- by it, in place of their missing rows. The last such reason is kept; only for the chunk's own run.
-- KEYS: meta.  ARGV: run id, reason.  Returns 1, or 0 (another run, or none: pruned).
if redis.call('HGET', KEYS[1], 'run_id') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'unrecorded', ARGV[2])
return 1
