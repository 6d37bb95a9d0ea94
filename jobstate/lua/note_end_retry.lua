-- The end task that holds the job's end stopped on an error it retries: say so, for `imgjobs status`
-- and `run`, until the end is written (finish_job) or a retry opens a new round (reopen_items).
-- KEYS: meta.  ARGV: run id, round, token (the end task's id), what is retried and why.
-- Returns 1, or 0 when the end is not this task's (or no longer due).
local meta = redis.call('HMGET', KEYS[1], 'run_id', 'round', 'end_claim', 'finished_at')
if meta[1] ~= ARGV[1] or tonumber(meta[2] or '0') ~= tonumber(ARGV[2]) or meta[3] ~= ARGV[3] or meta[4] then
  return 0
end
redis.call('HSET', KEYS[1], 'end_retrying', ARGV[4])
return 1
