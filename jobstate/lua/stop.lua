-- The job's run stopped (an embedded run's broker starts again with no worker of it alive): no chunk
-- of it runs, and the deliveries counted so far do not count toward dead-lettering (the stop left
-- them unacknowledged, not a worker's death). A job not finished is stopped from its last sign of
-- life (touched_at: a chunk started or items finished) until workers resume it (resume.lua).
-- KEYS: meta, inflight, deliveries.  ARGV: now.
-- Returns 1 when the job was marked stopped now.
redis.call('DEL', KEYS[2], KEYS[3])
local meta = redis.call('HMGET', KEYS[1], 'run_id', 'finished_at', 'stopped_at', 'touched_at', 'started_at')
if not meta[1] or meta[2] or meta[3] then return 0 end
redis.call('HSET', KEYS[1], 'stopped_at', meta[4] or meta[5] or ARGV[1])
return 1
