//! The Lua scripts the Redis store runs (the `.lua` files beside this
//! one): each reads and writes its keys in one step inside Redis, so that
//! replicas never interleave. Every script but `failure.lua` gives the
//! same answer when the same request runs twice: the store sends a
//! command again when the connection closed under it, and the first one
//! may have run.
//!
//! A script that measures slot expiry starts with `now.lua`: Redis's clock
//! in milliseconds, the one clock every replica shares, never a replica's
//! own (one running ahead would see every other replica's slots as
//! expired and take them; one running behind would hold its own past
//! their time). Scripts are replicated by their effects (Redis 5 and
//! later), so reading the time before writing is allowed.

pub(super) const RELEASE: &str = include_str!("release_lease.lua");
pub(super) const RENEW_LEASE: &str = include_str!("renew_lease.lua");
pub(super) const TAKE_LEASE: &str = include_str!("take_lease.lua");
pub(super) const ACQUIRE_SLOT: &str =
    concat!(include_str!("now.lua"), include_str!("acquire_slot.lua"));
pub(super) const RENEW_SLOT: &str =
    concat!(include_str!("now.lua"), include_str!("renew_slot.lua"));
pub(super) const FAILURE: &str = include_str!("failure.lua");
