-- An output shard's lease, kept or given back by the writer that holds it (jobstate/store.py).
-- KEYS: the lease.  ARGV: the holder's token, 'keep' or 'drop', the lease's time to live in ms.
-- Returns 1 when the token held the lease (kept for another ttl, or dropped), 0 when it did not: it
-- expired, and another writer may hold it now.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == 'drop' then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
