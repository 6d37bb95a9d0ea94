-- A chunk's run ended (done, failed or stopped): it no longer counts as running.
-- KEYS: meta, counts, inflight, deliveries.  ARGV: chunk id, delivery field, run id.
-- Returns the job's end_due: its round + 1 when this was the last work the job waited for. A chunk of
-- another run of the job id (pruned and submitted again: chunk ids repeat) leaves the new run alone.
if redis.call('HGET', KEYS[1], 'run_id') ~= ARGV[3] then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[2])
return end_due(KEYS[1], KEYS[2], KEYS[3])
