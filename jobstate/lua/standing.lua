-- Whether a running chunk should go on. KEYS: meta.  ARGV: run id, epoch.
-- Returns 'open', 'stopped' (cancelled since the chunk was sent) or 'unknown' (pruned).
local meta = redis.call('HMGET', KEYS[1], 'run_id', 'epoch', 'cancelled_at')
if meta[1] ~= ARGV[1] then return 'unknown' end
if tonumber(meta[2] or '0') ~= tonumber(ARGV[2]) or meta[3] then return 'stopped' end
return 'open'
