-- The producer's progress: first-stage chunks up to ARGV[2] are queued, and with ARGV[3] = '1' all of
-- them. Only for the run the producer created or resumed: a job pruned meanwhile is not recreated.
-- KEYS: meta.  ARGV: run id, parts sent, enqueued ('1' or '0'), now.  Returns 1, or 0 (another run).
if redis.call('HGET', KEYS[1], 'run_id') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'parts_sent', ARGV[2])
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'enqueued_at', ARGV[4]) end
return 1
