//! Database discovery: a target that names `databases` patterns instead of one database stands
//! for every database of its server whose name matches, found by asking the server.
//!
//! The configuration keeps such a target as a *template*. [`expand`] connects to the
//! template's maintenance database (its `dbname`, default `postgres`) through the same capped,
//! read-only path checks use, lists `pg_database`, and replaces the template with one concrete
//! target per matching database, named `TEMPLATE/DATABASE`. When the server cannot be asked,
//! the template stays in the configuration as a placeholder with no checks, so `/status` and
//! `deploywatch_up` show the failure, and the databases of its last successful discovery
//! ([`Known`]) stay targets: shown unreachable while the server is, their deployments kept, back
//! when it is. A listing that only waited in vain for a session of the server's budget (every
//! session busy with checks) is no failure: the last list stands and nothing is shown down.
//! The daemon expands again on every reload and every
//! `defaults.discovery_interval`, so databases that appear or go away are picked up. Listing
//! uses a session of the server's budget like every other query.
//!
//! Which names match is [`crate::config::databases`]' (pure); the listing is
//! [`crate::postgres::discovery`]'s.

use std::collections::HashMap;

use crate::config::databases::discovered_name;
use crate::config::{Config, TargetConfig};
use crate::postgres::discovery::{list_databases, DiscoveryError, ListTimeouts};
use crate::postgres::pool::Servers;

/// A configuration with its templates expanded, and the templates that could not be.
#[derive(Debug, Clone)]
pub(crate) struct Expanded {
    pub(crate) config: Config,
    /// Template target name and why its server could not be asked.
    pub(crate) failures: Vec<(String, String)>,
    /// Every template's databases as last listed successfully.
    pub(crate) known: Known,
}

/// The databases each template's server listed on its last successful discovery (all of them,
/// before the patterns are applied), by template name.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Known(pub HashMap<String, Vec<String>>);

impl Expanded {
    /// The concrete targets, each with its connection settings and cap: when a new pass
    /// gives the same, nothing needs restarting.
    pub(crate) fn shape(&self) -> Vec<String> {
        self.config
            .targets
            .iter()
            .filter(|t| t.discover.is_none())
            .map(|t| format!("{} {:?} {}", t.name, t.connection, t.max_connections))
            .collect()
    }
}

/// True when some target of `config` is a discovery template.
pub(crate) fn has_templates(config: &Config) -> bool {
    config.targets.iter().any(|t| t.discover.is_some())
}

/// Replaces every template of `config` by the targets its server lists. Targets without
/// `databases` are kept as they are.
/// The commands (`check`, `check --privileges`) see the whole fleet, whatever shard the
/// configuration names.
pub(crate) async fn expand(config: &Config) -> Expanded {
    let mut whole = config.clone();
    whole.server.shard = crate::shard::Shard::default();
    expand_on(&whole, &Servers::default(), &Known::default()).await
}

/// As [`expand`], for the daemon: sessions from `servers`' budgets, a template's `known`
/// databases kept when its server cannot be asked, and only the targets of the configuration's
/// shard (`server.shard`) kept.
pub(crate) async fn expand_on(config: &Config, servers: &Servers, known: &Known) -> Expanded {
    let mut targets = Vec::with_capacity(config.targets.len());
    let mut failures = Vec::new();
    let mut now_known = Known::default();
    for target in &config.targets {
        let Some(discovery) = &target.discover else {
            targets.push(target.clone());
            continue;
        };
        let timeouts = ListTimeouts {
            connect: config.defaults.connect_timeout,
            statement: config.defaults.timeout,
            lock: config.defaults.lock_timeout,
        };
        let budget = servers.get(
            &target.connection.server(),
            config.defaults.max_connections_per_server,
            config.defaults.server_connection_share,
        );
        match list_databases(&target.name, &target.connection, timeouts, budget).await {
            Ok(names) => {
                let selected = discovery.select(names.iter().map(String::as_str));
                if selected.is_empty() {
                    tracing::warn!(db_target = %target.name, "no database of the server matches the target's patterns");
                } else {
                    tracing::debug!(db_target = %target.name, databases = ?selected, "databases discovered");
                }
                for database in selected {
                    targets.push(concrete(target, &database));
                }
                now_known.0.insert(target.name.clone(), names);
            }
            // Every session was taken by checks: the server answers and nothing is known to
            // be wrong with its databases, so the last list stands as if just listed (shown
            // as it was, not unreachable); the next pass asks again.
            Err(error @ DiscoveryError::Busy { .. }) if known.0.contains_key(&target.name) => {
                tracing::warn!(db_target = %target.name, %error, "database discovery postponed: the server's sessions are all in use; its last list of databases is kept");
                if let Some(names) = known.0.get(&target.name) {
                    for database in discovery.select(names.iter().map(String::as_str)) {
                        targets.push(concrete(target, &database));
                    }
                    now_known.0.insert(target.name.clone(), names.clone());
                }
            }
            Err(error) => {
                tracing::warn!(db_target = %target.name, %error, "database discovery failed");
                failures.push((target.name.clone(), error.to_string()));
                targets.push(target.clone());
                // The last good list stays: its databases are still there, most likely, and
                // their checks will say whether they can be reached.
                if let Some(names) = known.0.get(&target.name) {
                    for database in discovery.select(names.iter().map(String::as_str)) {
                        targets.push(concrete(target, &database));
                    }
                    now_known.0.insert(target.name.clone(), names.clone());
                }
            }
        }
    }
    // A database listed by two templates, or a template that yields a name given to another
    // target, is monitored once: the first wins, in configuration order.
    let mut seen = std::collections::HashSet::new();
    targets.retain(|t| seen.insert(t.name.clone()));
    let mut config = config.clone();
    config.targets = targets;
    // Every replica lists every template's server; each keeps the databases its shard owns.
    config.retain_owned();
    Expanded {
        config,
        failures,
        known: now_known,
    }
}

fn concrete(template: &TargetConfig, database: &str) -> TargetConfig {
    TargetConfig {
        name: discovered_name(&template.name, database),
        connection: template.connection.with_dbname(database),
        max_connections: template.max_connections,
        version_query: template.version_query.clone(),
        checks: template.checks.clone(),
        discover: None,
    }
}
