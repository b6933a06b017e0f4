//! The database edge, and the only layer that sends SQL: connection settings ([`target`]) and
//! TLS ([`tls`]), capped session pools ([`pool`]) on sockets whose close waits for the server ([`socket`]), the read-only check runner ([`runner`]), the
//! statistics sampler ([`sampler`]), database listing for discovery ([`discovery`]) and the
//! privilege probe ([`privileges`]).

pub(crate) mod discovery;
pub mod pool;
pub(crate) mod privileges;
pub mod runner;
pub mod sampler;
pub(crate) mod socket;
pub mod target;
pub(crate) mod tls;
