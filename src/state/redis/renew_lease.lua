-- Extend a lease only if it still holds our fencing value.
-- KEYS[1] lease; ARGV[1] fence, ARGV[2] life ms.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
