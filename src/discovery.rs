//! Database discovery: a target that names `databases` patterns instead of one database stands
//! for every database of its server whose name matches, found by asking the server.
//!
//! The configuration keeps such a target as a *template*. [`expand`] connects to the
//! template's maintenance database (its `dbname`, default `postgres`) through the same capped,
//! read-only path checks use, lists `pg_database`, and replaces the template with one concrete
//! target per matching database, named `TEMPLATE/DATABASE`. When the server cannot be asked,
//! the template stays in the configuration as a placeholder with no checks, so `/status` and
//! `deploywatch_up` show the failure. The daemon expands again on every reload and every
//! `defaults.discovery_interval`, so databases that appear or go away are picked up.
//!
//! Which names match ([`Discovery::select`]) is pure and unit-tested; only [`expand`] does I/O.

use crate::config::{Config, TargetConfig};
use crate::outcome::Cell;
use crate::pool::TargetPool;
use crate::runner::query_read_only;

/// Databases that can never be monitored: templates and databases that refuse connections
/// are excluded by the query itself.
const LIST_DATABASES: &str =
    "SELECT datname::text FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1";

/// Which databases of a server a template target stands for.
#[derive(Debug, Clone)]
pub struct Discovery {
    pub include: Vec<glob::Pattern>,
    pub exclude: Vec<glob::Pattern>,
}

impl Discovery {
    /// The names that match an `include` pattern and no `exclude` pattern, in the given order.
    pub fn select<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        names
            .into_iter()
            .filter(|name| self.include.iter().any(|p| p.matches(name)))
            .filter(|name| !self.exclude.iter().any(|p| p.matches(name)))
            .map(str::to_string)
            .collect()
    }
}

/// The name of the target discovered for `database` under `template`.
pub fn discovered_name(template: &str, database: &str) -> String {
    format!("{template}/{database}")
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("database discovery on {server} failed: {message}")]
    Query { server: String, message: String },
    #[error("database discovery on {server}: pg_database returned an unexpected row")]
    Shape { server: String },
}

/// A configuration with its templates expanded, and the templates that could not be.
#[derive(Debug, Clone)]
pub struct Expanded {
    pub config: Config,
    /// Template target name and why its server could not be asked.
    pub failures: Vec<(String, String)>,
}

impl Expanded {
    /// The concrete targets' names and the failed templates, to tell whether a new discovery
    /// pass changed anything.
    pub fn shape(&self) -> (Vec<String>, Vec<String>) {
        (
            self.config.targets.iter().map(|t| t.name.clone()).collect(),
            self.failures.iter().map(|(name, _)| name.clone()).collect(),
        )
    }
}

/// True when some target of `config` is a discovery template.
pub fn has_templates(config: &Config) -> bool {
    config.targets.iter().any(|t| t.discover.is_some())
}

/// Replaces every template of `config` by the targets its server lists. Targets without
/// `databases` are kept as they are.
pub async fn expand(config: &Config) -> Expanded {
    let mut targets = Vec::with_capacity(config.targets.len());
    let mut failures = Vec::new();
    for target in &config.targets {
        let Some(discovery) = &target.discover else {
            targets.push(target.clone());
            continue;
        };
        match list_databases(target, config).await {
            Ok(names) => {
                let selected = discovery.select(names.iter().map(String::as_str));
                if selected.is_empty() {
                    tracing::warn!(target = %target.name, "no database of the server matches the target's patterns");
                } else {
                    tracing::debug!(target = %target.name, databases = ?selected, "databases discovered");
                }
                for database in selected {
                    targets.push(concrete(target, &database));
                }
            }
            Err(error) => {
                tracing::warn!(target = %target.name, %error, "database discovery failed");
                failures.push((target.name.clone(), error.to_string()));
                targets.push(target.clone());
            }
        }
    }
    // A database listed by two templates, or a template that yields a name given to another
    // target, is monitored once: the first wins, in configuration order.
    let mut seen = std::collections::HashSet::new();
    targets.retain(|t| seen.insert(t.name.clone()));
    let mut config = config.clone();
    config.targets = targets;
    Expanded { config, failures }
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

async fn list_databases(
    target: &TargetConfig,
    config: &Config,
) -> Result<Vec<String>, DiscoveryError> {
    let server = target.connection.display.clone();
    let pool = TargetPool::new(
        &target.name,
        target.connection.clone(),
        1,
        config.defaults.connect_timeout * 2 + config.defaults.timeout,
        config.defaults.connect_timeout,
    );
    let result = query_read_only(
        &pool,
        LIST_DATABASES,
        &[],
        config.defaults.timeout,
        config.defaults.lock_timeout,
    )
    .await;
    pool.close();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn discovery(include: &[&str], exclude: &[&str]) -> Discovery {
        let patterns = |list: &[&str]| {
            list.iter()
                .map(|p| glob::Pattern::new(p).expect("pattern"))
                .collect()
        };
        Discovery {
            include: patterns(include),
            exclude: patterns(exclude),
        }
    }

    #[test]
    fn include_and_exclude_patterns_select_names_in_order() {
        let names = ["app_eu", "postgres", "app_us", "app_us_test", "reporting"];
        let d = discovery(&["app_*", "reporting"], &["*_test"]);
        assert_eq!(d.select(names), vec!["app_eu", "app_us", "reporting"]);
    }

    #[test]
    fn star_selects_everything_but_the_excluded() {
        let d = discovery(&["*"], &["postgres"]);
        assert_eq!(d.select(["postgres", "a", "b"]), vec!["a", "b"]);
    }

    #[test]
    fn nothing_matches_gives_no_targets() {
        let d = discovery(&["shop_*"], &[]);
        assert!(d.select(["app", "postgres"]).is_empty());
    }

    #[test]
    fn character_classes_and_single_characters() {
        let d = discovery(&["db[0-9]", "tenant_?"], &[]);
        assert_eq!(
            d.select(["db1", "db12", "tenant_a", "tenant_ab", "dbx"]),
            vec!["db1", "tenant_a"]
        );
    }

    #[test]
    fn discovered_names_keep_the_template_in_front() {
        assert_eq!(discovered_name("prod", "app_eu"), "prod/app_eu");
    }
}
