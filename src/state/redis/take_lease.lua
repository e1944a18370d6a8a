-- Take a lease if nobody holds it; already ours (this same request, sent
-- again after its reply was lost) counts as taken. 1 if ours, else 0.
-- KEYS[1] lease; ARGV[1] fence, ARGV[2] life ms.
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
  return 1
end
if held then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
