//! SMTP store and forward, for listeners with `delivery = "spool"`: the
//! device's message is taken here ([`intake`]), kept on disk ([`queue`])
//! and sent upstream later with retries ([`deliver`]); what cannot be
//! delivered goes back to its sender as a report ([`dsn`]).

pub mod queue;
