//! What the end-to-end tests share, one file per concern; every area
//! module takes it all with `use crate::harness::*`.

mod cells;
mod clients;
mod faults;
pub mod imap_model;
mod metrics;
mod oldtls;
mod proxy;
mod redis;
mod upstream;

pub use self::redis::*;
pub use crate::common::*;
pub use cells::*;
pub use clients::*;
pub use faults::*;
pub use metrics::*;
pub use oldtls::*;
pub use proxy::*;
pub use upstream::*;
