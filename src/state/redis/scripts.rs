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

/// Redis's clock in milliseconds, as a script's first line: slot expiry
/// is measured by the one clock every replica shares, never by a
/// replica's own (one running ahead would see every other replica's slots
/// as expired and take them; one running behind would hold its own past
/// their time). Scripts are replicated by their effects (Redis 5 and
/// later), so reading the time before writing is allowed.
macro_rules! redis_now {
    () => {
        "local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"
    };
}

/// Take a session slot: drop expired members, then add ours if fewer than
/// the limit are held. KEYS[1] set; ARGV: life ms, limit, member.
pub(super) const ACQUIRE_SLOT: &str = concat!(
    redis_now!(),
    r"local life = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + life, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], life)
  return 1
end
return 0"
);

/// Keep a held slot alive for another life (only if it is still there).
/// KEYS[1] set; ARGV: life ms, member.
pub(super) const RENEW_SLOT: &str = concat!(
    redis_now!(),
    r"local life = tonumber(ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  redis.call('ZADD', KEYS[1], 'XX', now + life, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], life)
  return 1
end
return 0"
);

/// Count a failure: KEYS fail, lock; ARGV window ms, lockout failures,
/// lockout ms. Returns the failures in the window.
pub(super) const FAILURE: &str = r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if n >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
end
return n";
