//! Lists the databases of a server for discovery, through the same read-only path checks use
//! and a session of the server's budget. Templates and databases that refuse connections are
//! never listed.

use std::sync::Arc;
use std::time::Duration;

use crate::checks::outcome::Cell;
use crate::postgres::pool::{Connector, PoolError, ServerPool, TargetPool};
use crate::postgres::runner::query_read_only;
use crate::postgres::target::ConnectionSettings;

/// Databases that can never be monitored: templates and databases that refuse connections
/// are excluded by the query itself.
const LIST_DATABASES: &str =
    "SELECT datname::text FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1";

#[derive(Debug, thiserror::Error)]
pub(crate) enum DiscoveryError {
    #[error("database discovery on {server} failed: {message}")]
    Query { server: String, message: String },
    #[error("database discovery on {server}: pg_database returned an unexpected row")]
    Shape { server: String },
    /// No session of the server's budget became free in time: the server answers, its
    /// sessions are all taken by checks. Nothing is known to be wrong with its databases.
    #[error("database discovery on {server} waited for a session in vain: {message}")]
    Busy { server: String, message: String },
}

/// How long listing may take.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ListTimeouts {
    pub(crate) connect: Duration,
    pub(crate) statement: Duration,
    pub(crate) lock: Duration,
}

/// The names of the databases of `connection`'s server that accept connections, asked from
/// its maintenance database with one session of the server's budget (`budget`).
pub(crate) async fn list_databases(
    name: &str,
    connection: &ConnectionSettings,
    timeouts: ListTimeouts,
    budget: Arc<ServerPool>,
) -> Result<Vec<String>, DiscoveryError> {
    let server = connection.display.clone();
    let pool = TargetPool::on_server(
        budget,
        Arc::new(Connector::new(name, connection.clone())),
        1,
        timeouts.connect * 2 + timeouts.statement,
        timeouts.connect,
    );
    // The session first: a listing that only waited in line for one says nothing about the
    // server's databases, unlike one that could not connect or failed.
    let lease = match pool.acquire(name, pool.wait()).await {
        Ok(lease) => lease,
        Err(error @ PoolError::Exhausted { .. }) => {
            return Err(DiscoveryError::Busy {
                server,
                message: error.to_string(),
            })
        }
        Err(error) => {
            return Err(DiscoveryError::Query {
                server,
                message: error.to_string(),
            })
        }
    };
    let pool = pool.pinned(lease);
    let result = query_read_only(
        &pool,
        LIST_DATABASES,
        &[],
        timeouts.statement,
        timeouts.lock,
    )
    .await;
    let table = result.map_err(|error| DiscoveryError::Query {
        server: server.clone(),
        message: error.message,
    })?;
    table
        .rows
        .iter()
        .map(|row| match row.first() {
            Some(Cell::Text(name)) => Ok(name.clone()),
            _ => Err(DiscoveryError::Shape {
                server: server.clone(),
            }),
        })
        .collect()
}
