-- Release a lease only if it still holds our fencing value.
-- KEYS[1] lease; ARGV[1] fence.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
