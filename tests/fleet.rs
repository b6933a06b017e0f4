//! Many databases of one server: the per-server session budget holds under load and across a
//! reload, the daemon stays inside its share of a nearly full server and says why checks wait,
//! a failed rediscovery keeps the known databases, and server-wide statistics are read once per
//! server per sampling interval.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    base, get, get_json, parse_metrics, scrape_at, start, wait_for_answer, wait_for_metrics,
    wait_until, ConfigDir, MONITOR_ROLE,
};
use deploywatch::daemon::{DaemonHandle, Event};
use deploywatch_testkit::pgcluster::{ClusterOptions, PgCluster};
use deploywatch_testkit::workload::next_tick;
use tokio_util::sync::CancellationToken;

fn fleet_cluster(max_connections: u32) -> PgCluster {
    let pg = PgCluster::start(ClusterOptions {
        shared_preload_libraries: vec!["pg_stat_statements".to_string()],
        max_connections,
        ..ClusterOptions::default()
    })
    .unwrap_or_else(|error| panic!("cannot start a test PostgreSQL: {error}"));
    pg.create_monitoring_role(MONITOR_ROLE)
        .expect("the monitoring role");
    pg
}

/// Creates `fleet_template` (with `setup` run in it) and the named databases as its copies.
fn create_fleet(pg: &PgCluster, setup: &str, names: &[String]) {
    pg.create_database("fleet_template").expect("template");
    if !setup.is_empty() {
        pg.psql("fleet_template", setup).expect("template setup");
    }
    common::create_databases(pg, names, Some("fleet_template"));
}

/// A server of `max_connections` with `count` tenant databases made from a template that
/// `setup` ran in; their names.
fn tenant_fleet(max_connections: u32, setup: &str, count: usize) -> (PgCluster, Vec<String>) {
    let pg = fleet_cluster(max_connections);
    let names = tenant_names(count);
    create_fleet(&pg, setup, &names);
    (pg, names)
}

fn tenant_names(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("tenant_{i:02}")).collect()
}

/// A check pack whose checks keep sessions busy for a while.
const BUSY_PACK: &str = include_str!("fixtures/packs/busy.toml");

/// Counts deploywatch's sessions on the server every 50 ms until cancelled.
struct SessionPoll {
    seen: Arc<Mutex<Vec<(Instant, i64)>>>,
    cancel: CancellationToken,
}

impl SessionPoll {
    async fn start(pg: &PgCluster) -> SessionPoll {
        let client = pg.connect("postgres").await.expect("poller connects");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let cancel = CancellationToken::new();
        let (record, stop) = (seen.clone(), cancel.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while next_tick(&mut tick, &stop).await {
                if let Ok(row) = client
                    .query_one(
                        "SELECT /* fleet-test */ count(*) FROM pg_stat_activity WHERE application_name = 'deploywatch'",
                        &[],
                    )
                    .await
                {
                    let n: i64 = row.get(0);
                    record
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((Instant::now(), n));
                }
            }
        });
        SessionPoll { seen, cancel }
    }

    fn max_since(&self, since: Instant) -> i64 {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(at, _)| *at >= since)
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0)
    }

    fn polls(&self) -> usize {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The moment since which every poll saw at most `bound` sessions, when the latest `run`
    /// polls all did.
    fn settled_at(&self, bound: i64, run: usize) -> Option<Instant> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() < run {
            return None;
        }
        let tail = &seen[seen.len() - run..];
        tail.iter().all(|(_, n)| *n <= bound).then(|| tail[0].0)
    }
}

impl Drop for SessionPoll {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// An application load on the server: clients that keep its CPUs busy.
fn application_load(pg: &PgCluster, clients: usize, cancel: &CancellationToken) {
    for _ in 0..clients {
        let (url, cancel) = (pg.connection_string("postgres"), cancel.clone());
        tokio::spawn(async move {
            let Ok((client, connection)) =
                tokio_postgres::connect(&url, tokio_postgres::NoTls).await
            else {
                return;
            };
            tokio::spawn(connection);
            // Ends with its session too: a query on a closed client fails without waiting, so
            // looping on it would spin and keep the runtime from ever shutting down.
            while !cancel.is_cancelled() && !client.is_closed() {
                let _ = client
                    .simple_query("SELECT sum(i) FROM generate_series(1, 20000) i")
                    .await;
            }
        });
    }
}

/// Runs per check, by target and check name.
fn runs(handle: &DaemonHandle) -> Vec<(String, String, u64)> {
    handle
        .state
        .snapshot()
        .targets
        .iter()
        .flat_map(|(target, t)| {
            t.checks
                .iter()
                .map(move |(check, c)| (target.clone(), check.clone(), c.runs))
        })
        .collect()
}

/// Waits until every check of every target has finished a run after `before`.
async fn every_check_ran_again(
    handle: &DaemonHandle,
    before: &[(String, String, u64)],
    deadline: Duration,
) {
    let before: std::collections::HashMap<(String, String), u64> = before
        .iter()
        .map(|(t, c, n)| ((t.clone(), c.clone()), *n))
        .collect();
    wait_until("every check ran again", deadline, || {
        let now = runs(handle);
        let before = &before;
        async move {
            (!now.is_empty()
                && now.iter().all(|(t, c, n)| {
                    *n > before.get(&(t.clone(), c.clone())).copied().unwrap_or(0)
                }))
            .then_some(())
        }
    })
    .await;
}

fn fleet_config(pg: &PgCluster, budget: usize, per_target: usize, extra: &str) -> String {
    let port = pg.port();
    format!(
        "[defaults]\ninterval = \"2s\"\ntimeout = \"5s\"\nconnect_timeout = \"2s\"\ndiscovery_interval = \"2s\"\n\
         max_connections_per_server = {budget}\nmax_connections_per_target = {per_target}\n\n\
         [deployments]\nsample_interval = \"2s\"\n\n{extra}\
         [[targets]]\nname = \"low\"\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"{MONITOR_ROLE}\"\n\
         databases = [\"tenant_0*\", \"tenant_1*\", \"tenant_2*\"]\n\n\
         [[targets]]\nname = \"high\"\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"{MONITOR_ROLE}\"\n\
         databases = [\"tenant_3*\", \"tenant_4*\"]\n\n\
         [[targets]]\nname = \"admin\"\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"{MONITOR_ROLE}\"\ndbname = \"postgres\"\n"
    )
}

/// 50 discovered databases (two discovery entries) and a third entry on the same server share a
/// budget of 3 sessions: polling the server never sees more, under an application load, and a
/// reload that lowers the budget to 2 (and changes the per-target cap, so every target gets a
/// new pool) drains the old sessions before new ones count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_databases_never_take_more_than_the_server_budget_even_across_a_reload() {
    let (pg, _) = tenant_fleet(100, "", 50);
    let dir = ConfigDir::new();
    dir.write("checks/fleet.toml", BUSY_PACK);
    dir.write("deploywatch.toml", &fleet_config(&pg, 3, 2, ""));
    let poll = SessionPoll::start(&pg).await;
    let load = CancellationToken::new();
    application_load(&pg, 2, &load);

    let handle = start(&dir).await;
    let started = Instant::now();
    wait_until(
        "all 51 targets are watched",
        Duration::from_secs(60),
        || async { (handle.state.snapshot().targets.len() == 51).then_some(()) },
    )
    .await;
    every_check_ran_again(&handle, &[], Duration::from_secs(120)).await;
    let before_reload = runs(&handle);
    every_check_ran_again(&handle, &before_reload, Duration::from_secs(120)).await;
    assert!(poll.polls() > 20, "the server was polled");
    assert!(
        poll.max_since(started) <= 3,
        "at most 3 sessions before the reload, saw {}",
        poll.max_since(started)
    );
    assert!(
        poll.max_since(started) >= 2,
        "the budget was used, saw at most {}",
        poll.max_since(started)
    );

    dir.write("deploywatch.toml", &fleet_config(&pg, 2, 1, ""));
    let reloaded = Instant::now();
    handle.events.send(Event::Reload).await.expect("reload");
    let drained = wait_until(
        "the old sessions drained below the new budget",
        Duration::from_secs(30),
        || async { poll.settled_at(2, 20) },
    )
    .await;
    let after_reload = runs(&handle);
    every_check_ran_again(&handle, &after_reload, Duration::from_secs(120)).await;
    assert!(
        poll.max_since(reloaded) <= 3,
        "never more than the old budget while draining, saw {}",
        poll.max_since(reloaded)
    );
    assert!(
        poll.max_since(drained) <= 2,
        "at most the new budget once drained, saw {}",
        poll.max_since(drained)
    );
    let (_, body) = get(&format!("{}/metrics", base(&handle))).await;
    let m = parse_metrics(&body);
    let server = format!("127.0.0.1:{}", pg.port());
    assert_eq!(
        m.metric("deploywatch_server_session_limit")
            .label("server", &server)
            .value(),
        2.0,
        "{body}"
    );
    load.cancel();
    handle.shutdown().await.expect("clean shutdown");
}

/// A server whose `max_connections` is nearly used up by its application: deploywatch takes at
/// most its share (10 % of max_connections minus the reserved ones), the application can still
/// connect, and the queue of waiting checks and its reason are visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_server_keeps_deploywatch_inside_its_share_and_shows_why_checks_wait() {
    // 30 - 3 superuser-reserved = 27; 10 % of it is 2 sessions, below the configured 4.
    let (pg, _) = tenant_fleet(30, "", 10);
    let mut application = Vec::new();
    for _ in 0..22 {
        let client = pg.connect("postgres").await.expect("application connects");
        application.push(client);
    }
    let dir = ConfigDir::new();
    dir.write(
        "checks/slow.toml",
        r#"
[pack]
name = "slow"

[[check]]
name = "slow_a"
category = "health"
severity = "info"
interval = "1s"
sql = "SELECT count(*) FROM (SELECT pg_sleep(0.3)) s"

[[check]]
name = "slow_b"
category = "health"
severity = "info"
interval = "1s"
sql = "SELECT count(*) FROM (SELECT pg_sleep(0.3)) s"
"#,
    );
    dir.write(
        "deploywatch.toml",
        &format!(
            "[defaults]\ntimeout = \"5s\"\nconnect_timeout = \"2s\"\n\n[deployments]\nenabled = false\n\n\
             [[targets]]\nname = \"tenants\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{MONITOR_ROLE}\"\ndatabases = [\"tenant_*\"]\n",
            pg.port()
        ),
    );
    let poll = SessionPoll::start(&pg).await;
    let handle = start(&dir).await;
    let started = Instant::now();
    let url = base(&handle);
    let server = format!("127.0.0.1:{}", pg.port());

    // The queue is visible in the metrics and /status, with the reason.
    let status = wait_until(
        "waiting checks are reported",
        Duration::from_secs(60),
        || async {
            let m = scrape_at(&url).await?;
            let queue = m
                .metric("deploywatch_server_session_queue")
                .label("server", &server)
                .value_opt()?;
            let oldest = m
                .metric("deploywatch_server_session_oldest_wait_seconds")
                .label("server", &server)
                .value_opt()?;
            if queue < 1.0 || oldest <= 0.0 {
                return None;
            }
            let json = get_json(&format!("{url}/status")).await?;
            let server = json["servers"].as_array()?.first()?.clone();
            (server["queue"].as_u64()? > 0 && server["oldest_wait_seconds"].as_f64()? > 0.0)
                .then_some(server)
        },
    )
    .await;
    assert_eq!(status["server"], server.as_str(), "{status}");
    assert_eq!(status["limit"], 2, "{status}");
    assert_eq!(status["configured"], 4, "{status}");
    assert_eq!(status["max_connections"], 30, "{status}");
    let reason = status["limited_by"].as_str().unwrap_or_default();
    assert!(
        reason.contains("max_connections") && reason.contains("10 %"),
        "{status}"
    );
    assert!(
        status["oldest_waiting"]
            .as_str()
            .is_some_and(|w| w.starts_with("tenants/tenant_")),
        "{status}"
    );

    // Checks that could not get a session when due keep their place and run late: the due runs
    // they span are merged into them and counted, with the reason; none is skipped.
    let (skipped, limit) = wait_for_metrics(
        &url,
        "a check runs late for lack of a session",
        Duration::from_secs(60),
        |m| {
            (m.metric("deploywatch_check_delayed_total").sum() > 0.0).then(|| {
                let skipped = m
                    .metric("deploywatch_check_skipped_total")
                    .label("reason", "no_session")
                    .sum();
                let limit = m
                    .metric("deploywatch_server_session_limit")
                    .label("server", &server)
                    .value();
                (skipped, limit)
            })
        },
    )
    .await;
    assert_eq!(skipped, 0.0, "no run is skipped for lack of a session");
    assert_eq!(limit, 2.0);
    let text = wait_for_answer(
        &format!("{url}/status?format=text"),
        "/status says why a check runs late",
        Duration::from_secs(30),
        |_, text| text.contains("late: waited").then(|| text.to_string()),
    )
    .await;
    assert!(text.contains("for a session"), "{text}");

    // The application still gets in while deploywatch runs.
    for _ in 0..3 {
        let client = pg
            .connect("postgres")
            .await
            .expect("the application can still connect");
        client.simple_query("SELECT 1").await.expect("and query");
    }
    assert!(
        poll.max_since(started) <= 2,
        "deploywatch stayed inside its share, saw {} sessions",
        poll.max_since(started)
    );
    assert!(poll.polls() > 20);
    drop(application);
    handle.shutdown().await.expect("clean shutdown");
}

fn up(body: &str) -> Vec<(String, f64)> {
    parse_metrics(body)
        .metric("deploywatch_up")
        .by_label("target")
}

/// A rediscovery that fails after a success (the server is down) keeps every known database as
/// a target, shown unreachable, with its deployment; they come back with the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rediscovery_keeps_the_known_databases_and_their_deployments() {
    let mut pg = fleet_cluster(50);
    let names = vec![
        "tenant_a".to_string(),
        "tenant_b".to_string(),
        "tenant_c".to_string(),
    ];
    create_fleet(&pg, "", &names);
    let dir = ConfigDir::new();
    dir.write("token", "fleet-token");
    dir.write(
        "checks/one.toml",
        "[pack]\nname = \"one\"\n\n[[check]]\nname = \"one\"\ncategory = \"health\"\nseverity = \"info\"\nsql = \"SELECT 1\"\nexpect = \"== 1\"\n",
    );
    dir.write(
        "deploywatch.toml",
        &format!(
            "[server]\napi_token_file = \"token\"\n\n\
             [defaults]\ninterval = \"1s\"\ntimeout = \"2s\"\nconnect_timeout = \"1s\"\ndiscovery_interval = \"1s\"\n\n\
             [deployments]\nsample_interval = \"1s\"\n\n\
             [[targets]]\nname = \"tenants\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{MONITOR_ROLE}\"\ndatabases = [\"tenant_*\"]\n",
            pg.port()
        ),
    );
    let handle = start(&dir).await;
    let url = base(&handle);
    let all = |value: f64| -> Vec<(String, f64)> {
        names
            .iter()
            .map(|n| (format!("tenants/{n}"), value))
            .collect()
    };
    let wait_up = |want: Vec<(String, f64)>, what: &'static str| {
        let url = url.clone();
        async move {
            wait_for_metrics(&url, what, Duration::from_secs(60), |m| {
                (m.metric("deploywatch_up").by_label("target") == want).then_some(())
            })
            .await
        }
    };
    wait_up(all(1.0), "the three databases are watched").await;
    let announcement = deploywatch::commands::client::Announcement {
        target: Some("tenants/tenant_a"),
        version: "2.0.0",
        note: None,
        started_at: None,
    };
    let (code, answer) =
        deploywatch::commands::client::announce(&url, "fleet-token", &announcement)
            .await
            .expect("announce");
    assert_eq!(code.as_u16(), 201, "{answer}");
    let deployment_id = wait_until(
        "the announced deployment is tracked",
        Duration::from_secs(30),
        || async {
            handle
                .state
                .snapshot()
                .deployments
                .get("tenants/tenant_a")
                .map(|d| d.id)
        },
    )
    .await;

    pg.stop().expect("stop the server");
    // The failed rediscovery shows on the entry itself; the databases stay, unreachable.
    let mut want = all(0.0);
    want.insert(0, ("tenants".to_string(), 0.0));
    wait_up(want.clone(), "the databases are kept, unreachable").await;
    let held_since = Instant::now();
    while held_since.elapsed() < Duration::from_secs(4) {
        let (_, body) = get(&format!("{url}/metrics")).await;
        assert_eq!(up(&body), want, "kept through further failed rediscoveries");
        let snapshot = handle.state.snapshot();
        assert_eq!(
            snapshot.deployments.get("tenants/tenant_a").map(|d| d.id),
            Some(deployment_id),
            "the deployment is kept"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (_, status) = get(&format!("{url}/status?target=tenants/tenant_b")).await;
    assert!(
        status.contains("\"reachable\": false") || status.contains("\"reachable\":false"),
        "{status}"
    );

    pg.start_again().expect("start the server again");
    wait_up(all(1.0), "the databases come back with the server").await;
    assert_eq!(
        handle
            .state
            .snapshot()
            .deployments
            .get("tenants/tenant_a")
            .map(|d| d.id),
        Some(deployment_id)
    );
    handle.shutdown().await.expect("clean shutdown");
}

/// pg_stat_statements and pg_stat_activity are server-wide: with ten databases sampled every
/// second, they are queried once per second, not ten times (counted in pg_stat_statements).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_wide_views_are_read_once_per_server_per_interval() {
    let (pg, _) = tenant_fleet(50, "CREATE EXTENSION pg_stat_statements", 10);
    pg.psql("postgres", "CREATE EXTENSION pg_stat_statements")
        .expect("extension");
    let dir = ConfigDir::new();
    dir.write(
        "checks/one.toml",
        "[pack]\nname = \"one\"\n\n[[check]]\nname = \"one\"\ncategory = \"health\"\nseverity = \"info\"\ninterval = \"1m\"\nsql = \"SELECT 1\"\n",
    );
    dir.write(
        "deploywatch.toml",
        &format!(
            "[defaults]\ntimeout = \"5s\"\n\n[deployments]\nsample_interval = \"1s\"\n\n\
             [[targets]]\nname = \"tenants\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{MONITOR_ROLE}\"\ndatabases = [\"tenant_*\"]\n",
            pg.port()
        ),
    );
    let handle = start(&dir).await;
    wait_until(
        "every database is sampled",
        Duration::from_secs(60),
        || async {
            let snapshot = handle.state.snapshot();
            (snapshot.targets.len() == 10
                && snapshot.targets.values().all(|t| t.connections.is_some()))
            .then_some(())
        },
    )
    .await;

    let client = pg.connect("postgres").await.expect("connect");
    client
        .simple_query("SELECT /* fleet-test */ pg_stat_statements_reset()")
        .await
        .expect("reset");
    let reset_at = Instant::now();
    // The texts of query ids not seen before (`queryid = ANY(...)`) are fetched per database;
    // what is counted is the reading of the statistics.
    let count = |pattern: &'static str| {
        let client = &client;
        async move {
            let row = client
                .query_one(
                    "SELECT /* fleet-test */ coalesce(sum(calls), 0)::float8 FROM pg_stat_statements \
                     WHERE query ILIKE $1 AND query NOT ILIKE '%fleet-test%' \
                       AND query NOT ILIKE '%queryid = ANY(%'",
                    &[&pattern],
                )
                .await
                .expect("count");
            row.get::<_, f64>(0)
        }
    };
    let (statements, activity, elapsed) = wait_until(
        "the server-wide views were read a few times",
        Duration::from_secs(60),
        || async {
            let statements = count("%.pg_stat_statements%").await;
            let activity = count("%pg_stat_activity%").await;
            let elapsed = reset_at.elapsed().as_secs_f64();
            (statements >= 4.0 && activity >= 4.0).then_some((statements, activity, elapsed))
        },
    )
    .await;
    let intervals = elapsed / 1.0;
    assert!(
        statements <= intervals + 2.0,
        "pg_stat_statements read {statements} times in {elapsed:.1}s (once per second expected)"
    );
    assert!(
        activity <= intervals + 2.0,
        "pg_stat_activity read {activity} times in {elapsed:.1}s (once per second expected)"
    );
    // The per-database views are still read per database.
    let per_database = count("%pg_stat_user_tables%").await;
    assert!(
        per_database >= 10.0,
        "per-database views per database: {per_database}"
    );
    handle.shutdown().await.expect("clean shutdown");
}

/// CPU seconds (user and system, every thread) a process has used so far, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the daemon runs");
    let fields: Vec<f64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default()
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    // utime and stime, in clock ticks (100 a second on Linux).
    (fields.get(11).unwrap_or(&0.0) + fields.get(12).unwrap_or(&0.0)) / 100.0
}

/// A server stopped under a running daemon (its port then refuses every connection) costs the
/// daemon next to no CPU — no task retries without pause — and /metrics keeps answering; when
/// the server is back, so are its databases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stopped_under_a_running_daemon_costs_it_little_cpu_and_metrics_answer() {
    let (mut pg, names) = tenant_fleet(100, "", 20);
    let dir = ConfigDir::new();
    dir.write("checks/fleet.toml", BUSY_PACK);
    dir.write(
        "deploywatch.toml",
        &format!(
            "[defaults]\ninterval = \"1s\"\ntimeout = \"2s\"\nconnect_timeout = \"1s\"\ndiscovery_interval = \"1s\"\n\
             max_connections_per_server = 3\n\n[deployments]\nsample_interval = \"1s\"\n\n\
             [[targets]]\nname = \"tenants\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{MONITOR_ROLE}\"\ndatabases = [\"tenant_*\"]\n",
            pg.port()
        ),
    );
    let port = common::free_port();
    let log = dir.path().join("daemon.log");
    let mut daemon = dir
        .async_command()
        .args(["run", "--listen", &format!("127.0.0.1:{port}")])
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the daemon");
    let pid = daemon.id().expect("the daemon's pid");
    let url = format!("http://127.0.0.1:{port}");
    let metrics = || {
        let url = url.clone();
        async move {
            let answer = tokio::time::timeout(
                Duration::from_secs(5),
                deploywatch::commands::client::get(&format!("{url}/metrics"), "*/*"),
            )
            .await;
            match answer {
                Ok(Ok((code, body))) if code.is_success() => Some(body),
                _ => None,
            }
        }
    };
    let all = |value: f64| -> Vec<(String, f64)> {
        names
            .iter()
            .map(|n| (format!("tenants/{n}"), value))
            .collect()
    };
    // Waits at most `seconds` until `deploywatch_up` is `want`.
    let wait_up = |what: &'static str, seconds: u64, want: Vec<(String, f64)>| {
        let metrics = &metrics;
        async move {
            wait_until(what, Duration::from_secs(seconds), || async {
                metrics().await.filter(|body| up(body) == want).map(|_| ())
            })
            .await
        }
    };
    wait_up("the 20 databases are watched", 90, all(1.0)).await;

    pg.stop().expect("stop the server");
    let mut want_down = all(0.0);
    want_down.insert(0, ("tenants".to_string(), 0.0));
    wait_up("the databases show as unreachable", 60, want_down).await;
    // Ten seconds of a refusing server: every check (1 s interval), sampler and rediscovery keeps
    // failing. A task retrying without pause would take a whole core; the daemon's own work is
    // a few per cent of one.
    let (cpu_before, since) = (cpu_seconds(pid), Instant::now());
    let mut scrapes = 0;
    while since.elapsed() < Duration::from_secs(10) {
        let body = metrics().await;
        assert!(
            body.is_some(),
            "/metrics did not answer within 5 s while the server was down; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        scrapes += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let share = (cpu_seconds(pid) - cpu_before) / since.elapsed().as_secs_f64();
    assert!(scrapes >= 10, "scraped {scrapes} times");
    assert!(
        share < 0.3,
        "the daemon used {:.0} % of a core while its server was down; log:\n{}",
        share * 100.0,
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    pg.start_again().expect("start the server again");
    wait_up("the databases come back with the server", 90, all(1.0)).await;
    let _ = daemon.kill().await;
}

/// A rediscovery that only waited in vain for a session (the budget of one taken by a long
/// check) is no outage: the database it already watches never shows unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rediscovery_that_gets_no_session_never_shows_a_database_down() {
    let (pg, _) = tenant_fleet(50, "", 1);
    let dir = ConfigDir::new();
    dir.write(
        "checks/slow.toml",
        "[pack]\nname = \"slow\"\n\n[[check]]\nname = \"slow\"\ncategory = \"health\"\nseverity = \"info\"\n\
         timeout = \"20s\"\nsql = \"SELECT count(*) FROM (SELECT pg_sleep(5)) s\"\nexpect = \"== 1\"\n",
    );
    dir.write(
        "deploywatch.toml",
        &format!(
            "[defaults]\ninterval = \"1s\"\ntimeout = \"1s\"\nconnect_timeout = \"1s\"\ndiscovery_interval = \"1s\"\n\
             max_connections_per_server = 1\n\n\
             [deployments]\nenabled = false\n\n\
             [[targets]]\nname = \"tenants\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{MONITOR_ROLE}\"\ndatabases = [\"tenant_*\"]\n",
            pg.port()
        ),
    );
    let handle = start(&dir).await;
    let reachable = || {
        handle
            .state
            .snapshot()
            .targets
            .get("tenants/tenant_00")
            .and_then(|t| t.reachable)
    };
    wait_until(
        "the database is watched and its check ran",
        Duration::from_secs(60),
        || async { (reachable() == Some(true)).then_some(()) },
    )
    .await;
    // Listing waits at most 3 s for the one session (twice the connect timeout plus the
    // statement timeout); the check holds it 5 s at a time, so passes keep giving up.
    let watched = Instant::now();
    let mut longest_discovery_wait = 0.0f64;
    while watched.elapsed() < Duration::from_secs(20) {
        let snapshot = handle.state.snapshot();
        assert_eq!(
            snapshot
                .targets
                .get("tenants/tenant_00")
                .and_then(|t| t.reachable),
            Some(true),
            "shown unreachable after {:.1?} although only discovery waited for a session",
            watched.elapsed()
        );
        for server in &snapshot.servers {
            if server.oldest_waiting.as_deref() == Some("tenants") {
                longest_discovery_wait =
                    longest_discovery_wait.max(server.oldest_wait_seconds.unwrap_or(0.0));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        longest_discovery_wait >= 1.5,
        "discovery waited for the session (longest seen {longest_discovery_wait:.1} s)"
    );
    handle.shutdown().await.expect("clean shutdown");
}

/// A TCP relay to `upstream` on a slow network: what the server sends reaches the client
/// `delay` late, and a client that hangs up is seen by the server only `hold` later. Returns
/// the relay's port.
async fn slow_relay(upstream: u16, delay: Duration, hold: Duration) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("relay binds");
    let port = listener.local_addr().expect("relay address").port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
                continue;
            };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                while let Ok(n @ 1..) = client_read.read(&mut buf).await {
                    if server_write.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
                tokio::time::sleep(hold).await;
                let _ = server_write.shutdown().await;
            });
            let (line, mut arriving) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                loop {
                    let n = server_read.read(&mut buf).await.unwrap_or(0);
                    let _ = line.send((tokio::time::Instant::now() + delay, buf[..n].to_vec()));
                    if n == 0 {
                        return;
                    }
                }
            });
            tokio::spawn(async move {
                while let Some((due, bytes)) = arriving.recv().await {
                    tokio::time::sleep_until(due).await;
                    if bytes.is_empty() {
                        let _ = client_write.shutdown().await;
                        return;
                    }
                    if client_write.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// A handshake given up on (the server answers later than the connect timeout) keeps its place
/// in the server's budget until the server has closed the session, not just until deploywatch
/// stopped waiting: the backend is still there, and another database's session opened at once
/// would make two with a budget of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_handshake_holds_its_place_until_the_server_closed_the_session() {
    use deploywatch::postgres::pool::{Connector, ServerPool, TargetPool};
    use deploywatch::postgres::target::ConnectionSettings;

    let pg = fleet_cluster(50);
    let relay = slow_relay(
        pg.port(),
        Duration::from_millis(1500),
        Duration::from_secs(3),
    )
    .await;
    let settings = |port: u16, connect_timeout: Duration| {
        ConnectionSettings::parse(
            &format!(
                "host=127.0.0.1 port={port} user={MONITOR_ROLE} dbname=postgres sslmode=disable"
            ),
            connect_timeout,
        )
        .expect("settings")
    };
    // Both reach the same server and share one budget of one session.
    let budget = ServerPool::new("shared", 1, 1.0);
    let on_budget = |name: &str, port: u16, connect_timeout: Duration| {
        TargetPool::on_server(
            budget.clone(),
            Arc::new(Connector::new(name, settings(port, Duration::from_secs(5)))),
            1,
            Duration::from_secs(30),
            connect_timeout,
        )
    };
    let slow = on_budget("slow", relay, Duration::from_secs(1));
    let direct = on_budget("direct", pg.port(), Duration::from_secs(5));
    let poll = SessionPoll::start(&pg).await;
    let started = Instant::now();

    let error = slow
        .get()
        .await
        .err()
        .expect("the handshake runs out of time");
    assert!(error.to_string().contains("handshake"), "{error}");
    let gave_up = Instant::now();
    let lease = direct
        .get()
        .await
        .expect("a session once the place is free");
    let granted = Instant::now();
    // Held until a poll has seen it.
    wait_until(
        "a poll that sees the granted session",
        Duration::from_secs(10),
        || async { (poll.max_since(granted) >= 1).then_some(()) },
    )
    .await;
    drop(lease);

    assert!(
        poll.max_since(started) >= 1,
        "the abandoned handshake's backend was seen on the server"
    );
    assert!(
        poll.max_since(started) <= 1,
        "never more sessions than the budget of one, saw {} (the place was given back {:.1?} after the handshake was given up on)",
        poll.max_since(started),
        granted - gave_up
    );
    budget.close_idle();
}
