-- Take a session slot: drop expired members, then add ours if fewer than
-- the limit are held. Our member already there (this same request, sent
-- again after its reply was lost) counts as taken. 1 if taken, else 0.
-- KEYS[1] set; ARGV[1] life ms, ARGV[2] limit, ARGV[3] member.
local life = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  redis.call('ZADD', KEYS[1], 'XX', now + life, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], life)
  return 1
end
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + life, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], life)
  return 1
end
return 0
