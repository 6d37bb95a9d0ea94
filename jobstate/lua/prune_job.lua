-- Delete a job that finished before the cutoff, all of it in one step: a retry that reopened it
-- (retry deletes finished_at) keeps it.
-- KEYS: the job's keys (meta first), then the jobs set.  ARGV: job id, cutoff time.
local finished = tonumber(redis.call('HGET', KEYS[1], 'finished_at'))
if not finished or finished >= tonumber(ARGV[2]) then return 0 end
redis.call('DEL', unpack(KEYS, 1, #KEYS - 1))
redis.call('SREM', KEYS[#KEYS], ARGV[1])
return 1
