//! The Lua scripts the Redis store runs: each one reads and writes its
//! keys in one step inside Redis, so that replicas never interleave.

/// Release a lease only if it still holds our fencing value.
pub(super) const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// Extend a lease only if it still holds our fencing value.
pub(super) const RENEW_LEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

/// Take a session slot: drop expired members, then add ours if fewer than
/// the limit are held. KEYS[1] set; ARGV: now ms, expiry ms, limit, member.
pub(super) const ACQUIRE_SLOT: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) - tonumber(ARGV[1]))
  return 1
end
return 0";

/// Keep a held slot alive (only if it is still there).
pub(super) const RENEW_SLOT: &str = r"
local n = redis.call('ZADD', KEYS[1], 'XX', 'CH', ARGV[2], ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) - tonumber(ARGV[1]))
  return 1
end
return n";

/// Count a failure: KEYS fail, lock; ARGV window ms, lockout failures,
/// lockout ms. Returns the failures in the window.
pub(super) const FAILURE: &str = r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if n >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
end
return n";
