-- A chunk's run ended (done, failed or stopped): it no longer counts as running.
-- KEYS: meta, counts, inflight, deliveries.  ARGV: chunk id, delivery field.
-- Returns the job's end_due: its round + 1 when this was the last work the job waited for.
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[2])
return end_due(KEYS[1], KEYS[2], KEYS[3])
