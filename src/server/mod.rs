//! What the daemon serves: the HTTP endpoints ([`http`]), the Prometheus rendering of the
//! state ([`metrics`]) and the `/status` report ([`status`]).

pub(crate) mod http;
pub mod metrics;
pub(crate) mod status;
