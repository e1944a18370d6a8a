//! Bytes in and out, no protocol: the [`stream::Stream`] (plain or TLS),
//! the buffered [`conn::Conn`] with its bounded line reader, the TLS
//! configurations, dialling out, and the PROXY header a load balancer puts
//! in front of a connection.

pub(crate) mod conn;
pub(crate) mod dial;
pub mod proxy_protocol;
pub(crate) mod stream;
pub(crate) mod tls;

pub(crate) use conn::{Conn, LineError};
