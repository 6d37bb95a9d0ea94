-- `imgjobs retry`: items go back to not finished, and to not handed past any stage, so that they run
-- every stage again. With ARGV[4] = '1' (until one of the retry's batches moves an item) the job also
-- reopens in the same step as its first items: a new round, no longer finished nor cancelled; so
-- `imgjobs prune` either deletes the job before or keeps it.
-- An item is reopened when it failed, or, with ARGV[5] = '1' (the job was cancelled and has ended),
-- when it never finished: it was cancelled.
-- KEYS: meta, counts, done, failed, then handed past stages 0 .. n - 1.
-- ARGV: run id, epoch (as the retry read it), n, reopen ('1' or '0'), cancelled ('1' or '0'), now, then
--       the n stage counter fields, then positions. The time the job spent finished before it reopens
--       does not count as its running time (stopped_s).
-- Returns {round, then per position the stages it was handed past, as bits (1 = stage 0), or -1
-- when it was neither failed nor cancelled: left as it is}; {-1} for another run, or none (pruned);
-- {-2} when the job was cancelled since the retry read it (its epoch moved on): nothing changes.
local meta = redis.call('HMGET', KEYS[1], 'run_id', 'round', 'epoch')
if meta[1] ~= ARGV[1] then return {-1} end
if tonumber(meta[3] or '0') ~= tonumber(ARGV[2]) then return {-2} end
local n = tonumber(ARGV[3])
local cancelled = ARGV[5] == '1'
local reply, reopened, moved = {tonumber(meta[2] or '0')}, 0, 0
for i = 7 + n, #ARGV do
  local position = tonumber(ARGV[i])
  local done = redis.call('GETBIT', KEYS[3], position) == 1
  local was_failed = redis.call('GETBIT', KEYS[4], position) == 1
  if (done and was_failed) or (not done and cancelled) then
    if done then
      redis.call('SETBIT', KEYS[3], position, 0)
      redis.call('SETBIT', KEYS[4], position, 0)
      reopened = reopened + 1
    end
    local stages = 0
    for s = 1, n do
      if redis.call('SETBIT', KEYS[4 + s], position, 0) == 1 then
        redis.call('HINCRBY', KEYS[2], ARGV[6 + s], -1)
        stages = stages + bit.lshift(1, s - 1)
      end
    end
    reply[#reply + 1] = stages
    moved = moved + 1
  else
    reply[#reply + 1] = -1
  end
end
if reopened > 0 then
  redis.call('HINCRBY', KEYS[2], 'done', -reopened)
  redis.call('HINCRBY', KEYS[2], 'failed', -reopened)
end
if ARGV[4] == '1' and moved > 0 then
  reply[1] = redis.call('HINCRBY', KEYS[1], 'round', 1)
  local ended = redis.call('HMGET', KEYS[1], 'finished_at', 'started_at')
  if ended[1] and ended[2] then
    redis.call('HINCRBYFLOAT', KEYS[1], 'stopped_s', math.max(tonumber(ARGV[6]) - tonumber(ended[1]), 0))
  end
  redis.call('HDEL', KEYS[1], 'finished_at', 'cancelled_at', 'end_claim', 'end_error', 'end_sent', 'end_retrying')
end
return reply
