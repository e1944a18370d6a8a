//! Bytes in and out, no protocol: the [`stream::Stream`] (plain or TLS),
//! the buffered [`conn::Conn`] with its bounded line reader, the TLS
//! configurations, dialling out, and the PROXY header a load balancer puts
//! in front of a connection.

pub mod conn;
pub mod dial;
pub mod proxy_protocol;
pub mod stream;
pub mod tls;

pub use conn::{Conn, LineError};
