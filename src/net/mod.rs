//! Bytes in and out, no protocol: the [`stream::Stream`] (plain or TLS),
//! the buffered [`conn::Conn`] with its bounded line reader, the TLS
//! configurations (upstream in `tls`, towards devices in `device_tls`, a
//! listener's self-signed certificate in `self_signed`), listening with
//! room for a burst (`listen`), dialling out, and the PROXY header a load
//! balancer puts in front of a connection.

pub(crate) mod conn;
pub mod device_tls;
pub(crate) mod dial;
pub(crate) mod listen;
pub mod proxy_protocol;
pub mod self_signed;
pub(crate) mod stream;
pub(crate) mod tls;

pub(crate) use conn::{Conn, LineError};
