-- Count a failure. KEYS[1] fail, KEYS[2] lock; ARGV[1] window ms,
-- ARGV[2] lockout failures, ARGV[3] lockout ms. Returns the failures in
-- the window. (Sent again after a lost reply, a failure counts twice.)
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if n >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
end
return n
