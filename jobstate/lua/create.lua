-- Create a job where none of that id exists, in one step, so two producers submitting the same job
-- cannot both create it.
-- KEYS: meta, jobs set.  ARGV: job id, then the meta hash as field, value pairs.
-- Returns 1 when created, 0 when the job existed.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[2], ARGV[1])
return 1
