//! What the daemon serves: the HTTP endpoints ([`http`]), the Prometheus rendering of the
//! state ([`metrics`]) and the `/status` report ([`status`]), and whom its own HTTPS requests trust ([`trust`]).

pub(crate) mod http;
pub mod metrics;
pub(crate) mod status;
pub mod trust;
