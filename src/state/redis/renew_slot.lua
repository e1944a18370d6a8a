-- Keep a held slot alive for another life (only if it is still there).
-- KEYS[1] set; ARGV[1] life ms, ARGV[2] member.
local life = tonumber(ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  redis.call('ZADD', KEYS[1], 'XX', now + life, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], life)
  return 1
end
return 0
