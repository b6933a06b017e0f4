//! A throwaway local PostgreSQL cluster for the integration tests and `deploywatch demo`.
//!
//! It finds the server binaries, runs `initdb` into a fresh directory under the system temp
//! dir, starts the server on 127.0.0.1 and a free port, and on drop stops it and removes the
//! directory, so nothing is left behind. PostgreSQL refuses to run as root: when this process is
//! root, the directory is given to the `postgres` OS user and the server binaries run as that
//! user through `runuser` (or `su`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::process;

static COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, thiserror::Error)]
pub enum PgClusterError {
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install them with \
         `apt-get install -y postgresql` (Debian/Ubuntu) or set PG_BINDIR to the directory that holds initdb"
    )]
    BinariesNotFound,
    #[error(
        "PG_BINDIR={0} does not hold the PostgreSQL server binaries initdb, pg_ctl and postgres"
    )]
    NotAServerBinDir(PathBuf),
    #[error("there is no `postgres` OS user to run PostgreSQL as (it refuses to run as root): create it with `useradd --system postgres`")]
    NoPostgresUser,
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("PostgreSQL did not start: {message}\n--- server log (tail) ---\n{log}")]
    Start { message: String, log: String },
    #[error("invalid database name {0:?}: use lower-case letters, digits and '_'")]
    InvalidName(String),
}

/// How to set up the cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `None` picks a free port.
    pub port: Option<u16>,
    /// Libraries to preload (only those present in the installation are used).
    pub shared_preload_libraries: Vec<String>,
    /// Extra `postgresql.conf` settings.
    pub extra_conf: Vec<(String, String)>,
    /// Replaces `pg_hba.conf` entirely.
    pub hba: Option<String>,
    pub max_connections: u32,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            port: None,
            shared_preload_libraries: Vec::new(),
            extra_conf: Vec::new(),
            hba: None,
            max_connections: 50,
        }
    }
}

/// A running throwaway cluster. Dropping it stops the server and removes its directory.
pub struct PgCluster {
    bindir: PathBuf,
    base: PathBuf,
    port: u16,
    as_postgres: bool,
    preloaded: Vec<String>,
    running: bool,
}

fn has_server(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|b| dir.join(b).is_file())
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`.
pub fn find_bindir() -> Result<PathBuf, PgClusterError> {
    if let Some(dir) = std::env::var_os("PG_BINDIR").filter(|d| !d.is_empty()) {
        // Asked for one installation: never quietly run another one instead.
        let dir = PathBuf::from(dir);
        return if has_server(&dir) {
            Ok(dir)
        } else {
            Err(PgClusterError::NotAServerBinDir(dir))
        };
    }
    // Debian keeps the server under /usr/lib/postgresql/<major>/bin; prefer the newest.
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<(u32, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let major = e.file_name().to_str()?.parse::<u32>().ok()?;
                Some((major, e.path().join("bin")))
            })
            .filter(|(_, dir)| has_server(dir))
            .collect();
        versions.sort();
        if let Some((_, dir)) = versions.pop() {
            return Ok(dir);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_server(&dir) {
                return Ok(dir);
            }
        }
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && has_server(&dir) {
            return Ok(dir);
        }
    }
    Err(PgClusterError::BinariesNotFound)
}

/// Where the installation of `bindir` keeps its loadable modules, most likely first: what its own
/// `pg_config --pkglibdir` says (when it ships one), then `lib/postgresql` (the layout of a plain
/// `--prefix` build, Homebrew and relocatable builds) and `lib` (Debian's
/// /usr/lib/postgresql/<major>/lib) beside `bin`.
fn module_dirs(bindir: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let pg_config = bindir.join("pg_config");
    if pg_config.is_file() {
        if let Ok(output) = Command::new(&pg_config).arg("--pkglibdir").output() {
            let dir = String::from_utf8_lossy(&output.stdout).trim().to_string();
            if output.status.success() && !dir.is_empty() {
                dirs.push(PathBuf::from(dir));
            }
        }
    }
    if let Some(prefix) = bindir.parent() {
        dirs.push(prefix.join("lib").join("postgresql"));
        dirs.push(prefix.join("lib"));
    }
    dirs
}

/// The shared library of module `name` (e.g. `pg_stat_statements`) in the installation of
/// `bindir`, if it has one.
pub fn find_library(bindir: &Path, name: &str) -> Option<PathBuf> {
    module_dirs(bindir)
        .into_iter()
        .map(|dir| dir.join(format!("{name}.so")))
        .find(|path| path.is_file())
}

fn is_root() -> bool {
    // The owner of /proc/self is the effective user of this process.
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn postgres_user_exists() -> bool {
    Command::new("id")
        .arg("-u")
        .arg("postgres")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn free_port() -> Result<u16, PgClusterError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| PgClusterError::Io {
            path: PathBuf::from("127.0.0.1:0"),
            source,
        })
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl PgCluster {
    pub fn start(options: ClusterOptions) -> Result<PgCluster, PgClusterError> {
        let bindir = find_bindir()?;
        let as_postgres = is_root();
        if as_postgres && !postgres_user_exists() {
            return Err(PgClusterError::NoPostgresUser);
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let base = std::env::temp_dir().join(format!(
            "dwpg-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&base).map_err(|source| PgClusterError::Io {
            path: base.clone(),
            source,
        })?;
        let preloaded: Vec<String> = options
            .shared_preload_libraries
            .iter()
            .filter(|lib| find_library(&bindir, lib).is_some())
            .cloned()
            .collect();
        let mut cluster = PgCluster {
            bindir,
            base,
            port: 0,
            as_postgres,
            preloaded,
            running: false,
        };
        if as_postgres {
            cluster.run_checked(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&cluster.base),
            )?;
        }
        let data = cluster.data_dir();
        let initdb = cluster.server_command(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
        );
        cluster.run_checked_server(initdb)?;
        let mut conf = format!(
            "\n# deploywatch test cluster\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = {}\n\
             track_io_timing = on\nlogging_collector = off\n",
            cluster.base.display(),
            options.max_connections
        );
        if !cluster.preloaded.is_empty() {
            conf.push_str(&format!(
                "shared_preload_libraries = '{}'\n",
                cluster.preloaded.join(",")
            ));
            if cluster.preloaded.iter().any(|l| l == "pg_stat_statements") {
                conf.push_str("pg_stat_statements.track = all\n");
            }
        }
        for (key, value) in &options.extra_conf {
            conf.push_str(&format!("{key} = {value}\n"));
        }
        cluster.append(&data.join("postgresql.conf"), &conf)?;
        if let Some(hba) = &options.hba {
            cluster.write(&data.join("pg_hba.conf"), hba)?;
        }
        let mut last_error = None;
        for _ in 0..3 {
            cluster.port = match options.port {
                Some(port) => port,
                None => free_port()?,
            };
            match cluster.pg_ctl_start() {
                Ok(()) => {
                    cluster.running = true;
                    tracing::debug!(port = cluster.port, base = %cluster.base.display(), "test PostgreSQL started");
                    return Ok(cluster);
                }
                Err(error) => last_error = Some(error),
            }
            if options.port.is_some() {
                break;
            }
        }
        Err(last_error.unwrap_or(PgClusterError::Start {
            message: "unknown".into(),
            log: String::new(),
        }))
    }

    fn server_command(&self, binary: &str, args: &[&str]) -> Command {
        let program = self.bindir.join(binary);
        if self.as_postgres {
            let mut command =
                if Path::new("/usr/sbin/runuser").exists() || Path::new("/sbin/runuser").exists() {
                    let mut c = Command::new("runuser");
                    c.args(["-u", "postgres", "--"]).arg(&program).args(args);
                    c
                } else {
                    let mut line = shell_quote(&program.to_string_lossy());
                    for arg in args {
                        line.push(' ');
                        line.push_str(&shell_quote(arg));
                    }
                    let mut c = Command::new("su");
                    c.args(["postgres", "-s", "/bin/sh", "-c", &line]);
                    c
                };
            command.current_dir(&self.base);
            command
        } else {
            let mut c = Command::new(program);
            c.args(args);
            c
        }
    }

    fn run_checked(&self, command: &mut Command) -> Result<Output, PgClusterError> {
        let description = format!("{command:?}");
        let output = command.output().map_err(|source| PgClusterError::Io {
            path: PathBuf::from(description.clone()),
            source,
        })?;
        if output.status.success() {
            Ok(output)
        } else {
            Err(PgClusterError::Command {
                command: description,
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            })
        }
    }

    fn run_checked_server(&self, mut command: Command) -> Result<Output, PgClusterError> {
        self.run_checked(&mut command)
    }

    fn append(&self, path: &Path, text: &str) -> Result<(), PgClusterError> {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|source| PgClusterError::Io {
                path: path.to_path_buf(),
                source,
            })
    }

    fn write(&self, path: &Path, text: &str) -> Result<(), PgClusterError> {
        std::fs::write(path, text).map_err(|source| PgClusterError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    fn log_path(&self) -> PathBuf {
        self.base.join("server.log")
    }

    fn pg_ctl_start(&self) -> Result<(), PgClusterError> {
        let data = self.data_dir().to_string_lossy().to_string();
        let log = self.log_path().to_string_lossy().to_string();
        let options = format!("-p {}", self.port);
        let command = self.server_command(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &options, "-w", "-t", "60", "start",
            ],
        );
        self.run_checked_server(command)
            .map(|_| ())
            .map_err(|error| PgClusterError::Start {
                message: error.to_string(),
                log: tail(&self.log_path(), 30),
            })
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<(), PgClusterError> {
        let data = self.data_dir().to_string_lossy().to_string();
        let command = self.server_command(
            "pg_ctl",
            &["-D", &data, "-m", mode, "-w", "-t", "60", "stop"],
        );
        self.run_checked_server(command).map(|_| ())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn base_dir(&self) -> &Path {
        &self.base
    }

    pub fn data_dir(&self) -> PathBuf {
        self.base.join("data")
    }

    /// `key=value` connection string for the superuser.
    pub fn connection_string(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname}",
            self.port
        )
    }

    /// A session on `dbname` as the superuser (the application's, not the monitor's), its
    /// connection driven by a task of its own that ends with the client.
    pub async fn connect(
        &self,
        dbname: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) =
            tokio_postgres::connect(&self.connection_string(dbname), tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// The directory of the server binaries this cluster runs.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    pub fn pg_stat_statements_available(&self) -> bool {
        self.preloaded.iter().any(|l| l == "pg_stat_statements")
    }

    fn psql_command(&self, dbname: &str) -> Command {
        let psql = self.bindir.join("psql");
        let mut command = Command::new(if psql.is_file() {
            psql
        } else {
            PathBuf::from("psql")
        });
        command
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(dbname)
            .env("PGCONNECT_TIMEOUT", "10");
        command
    }

    pub fn create_database(&self, name: &str) -> Result<(), PgClusterError> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(PgClusterError::InvalidName(name.to_string()));
        }
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .map(|_| ())
    }

    /// Creates the role deploywatch should connect as: `pg_monitor` (statistics views) and
    /// `pg_read_all_data` (the tables checks read), able to log in, not a superuser. Before
    /// PostgreSQL 14, which has no `pg_read_all_data`, the bootstrap superuser's future tables
    /// are readable by it instead (default privileges in `template1` and `postgres`, which
    /// new databases copy).
    pub fn create_monitoring_role(&self, name: &str) -> Result<(), PgClusterError> {
        if self.server_version_num()? >= 140000 {
            self.psql(
                "postgres",
                &format!("CREATE ROLE {name} LOGIN; GRANT pg_monitor, pg_read_all_data TO {name}"),
            )?;
        } else {
            self.psql(
                "postgres",
                &format!("CREATE ROLE {name} LOGIN; GRANT pg_monitor TO {name}"),
            )?;
            let defaults = format!(
                "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO {name}; \
                 ALTER DEFAULT PRIVILEGES GRANT SELECT ON SEQUENCES TO {name}"
            );
            for database in ["template1", "postgres"] {
                self.psql(database, &defaults)?;
            }
        }
        Ok(())
    }

    /// Runs SQL with psql and returns its unaligned output.
    pub fn psql(&self, dbname: &str, sql: &str) -> Result<String, PgClusterError> {
        let output = self.run_checked(self.psql_command(dbname).arg("-c").arg(sql))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    pub fn psql_file(&self, dbname: &str, path: &Path) -> Result<String, PgClusterError> {
        let output = self.run_checked(self.psql_command(dbname).arg("-f").arg(path))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    pub fn server_version_num(&self) -> Result<u32, PgClusterError> {
        let text = self.psql("postgres", "SHOW server_version_num")?;
        text.trim().parse().map_err(|_| PgClusterError::Command {
            command: "SHOW server_version_num".into(),
            status: "unexpected output".into(),
            stderr: text,
        })
    }

    /// Fast shutdown; `start_again` brings it back on the same port.
    pub fn stop(&mut self) -> Result<(), PgClusterError> {
        self.pg_ctl_stop("fast")?;
        self.running = false;
        Ok(())
    }

    pub fn start_again(&mut self) -> Result<(), PgClusterError> {
        self.pg_ctl_start()?;
        self.running = true;
        Ok(())
    }

    pub fn restart(&mut self) -> Result<(), PgClusterError> {
        self.stop()?;
        self.start_again()
    }

    /// The postmaster's process id, while the server runs.
    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// The postmaster (first) and its children: every process of the server.
    pub fn server_pids(&self) -> Vec<u32> {
        let Some(root) = self.postmaster_pid() else {
            return Vec::new();
        };
        let children = process::all()
            .into_iter()
            .filter(|&pid| process::stat(pid).is_some_and(|stat| stat.parent == root));
        std::iter::once(root).chain(children).collect()
    }

    fn signal(&self, signal: &str) -> Result<(), PgClusterError> {
        let pids: Vec<String> = self.server_pids().iter().map(u32::to_string).collect();
        if pids.is_empty() {
            return Ok(());
        }
        self.run_checked(Command::new("kill").arg(signal).args(&pids))
            .map(|_| ())
    }

    /// Freezes the server (SIGSTOP to the postmaster and its children): a hung database.
    pub fn pause(&self) -> Result<(), PgClusterError> {
        self.signal("-STOP")
    }

    pub fn resume(&self) -> Result<(), PgClusterError> {
        self.signal("-CONT")
    }
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running {
            let _ = self.resume();
            if let Err(error) = self.pg_ctl_stop("immediate") {
                tracing::warn!(%error, "cannot stop the test PostgreSQL; killing it");
                let _ = self.signal("-KILL");
            }
            // Wait briefly for the postmaster to go away before removing its directory.
            for _ in 0..50 {
                if self.postmaster_pid().is_none() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if let Err(error) = std::fs::remove_dir_all(&self.base) {
            tracing::warn!(%error, base = %self.base.display(), "cannot remove the test cluster directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_starts_answers_and_leaves_nothing_behind() {
        let mut cluster = PgCluster::start(ClusterOptions::default()).expect("start");
        cluster.create_database("probe").expect("create");
        assert_eq!(
            cluster
                .psql("probe", "SELECT 40 + 2")
                .expect("query")
                .trim(),
            "42"
        );
        cluster.restart().expect("restart");
        assert_eq!(
            cluster.psql("probe", "SELECT 1").expect("query").trim(),
            "1"
        );
        let base = cluster.base_dir().to_path_buf();
        let pid = cluster.postmaster_pid().expect("pid");
        drop(cluster);
        assert!(!base.exists(), "directory removed");
        // A zombie (state Z) is gone too: it only waits for its reaper.
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim().chars().next())
            })
            .flatten();
        assert!(
            matches!(state, None | Some('Z')),
            "postmaster gone, state {state:?}"
        );
    }

    #[test]
    fn modules_are_found_in_lib_postgresql_and_in_lib() {
        let root = tempfile::tempdir().expect("tempdir");
        // A `--prefix` build, Homebrew, relocatable builds: <prefix>/lib/postgresql.
        // Debian: /usr/lib/postgresql/<major>/lib.
        for layout in ["lib/postgresql", "lib"] {
            let prefix = root.path().join(layout.replace('/', "_"));
            std::fs::create_dir_all(prefix.join("bin")).expect("bin");
            std::fs::create_dir_all(prefix.join(layout)).expect("lib");
            let library = prefix.join(layout).join("pg_stat_statements.so");
            std::fs::write(&library, b"").expect("library");
            let bin = prefix.join("bin");
            assert_eq!(find_library(&bin, "pg_stat_statements"), Some(library));
            assert_eq!(find_library(&bin, "no_such_module"), None);
        }
    }

    #[test]
    fn the_installation_s_own_pg_config_names_the_module_directory() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().expect("tempdir");
        let bindir = root.path().join("bin");
        let modules = root.path().join("elsewhere/modules");
        std::fs::create_dir_all(&bindir).expect("bin");
        std::fs::create_dir_all(&modules).expect("modules");
        let pg_config = bindir.join("pg_config");
        std::fs::write(
            &pg_config,
            format!(
                "#!/bin/sh\n[ \"$1\" = --pkglibdir ] && echo '{}'\n",
                modules.display()
            ),
        )
        .expect("pg_config");
        std::fs::set_permissions(&pg_config, std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::write(modules.join("pg_stat_statements.so"), b"").expect("library");
        assert_eq!(
            find_library(&bindir, "pg_stat_statements"),
            Some(modules.join("pg_stat_statements.so"))
        );
    }

    #[test]
    fn a_paused_cluster_does_not_answer_until_resumed() {
        let cluster = PgCluster::start(ClusterOptions::default()).expect("start");
        cluster.pause().expect("pause");
        let mut command = cluster.psql_command("postgres");
        command
            .env("PGCONNECT_TIMEOUT", "2")
            .arg("-c")
            .arg("SELECT 1");
        let frozen = command.output().expect("psql");
        assert!(!frozen.status.success(), "no answer while paused");
        cluster.resume().expect("resume");
        assert_eq!(
            cluster.psql("postgres", "SELECT 1").expect("query").trim(),
            "1"
        );
    }
}
