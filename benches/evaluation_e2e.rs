//! The evaluation end to end on a real PostgreSQL. Run with
//! `cargo bench --bench evaluation_e2e`; prints Markdown for BENCHMARKS.md.
//! `DEPLOYWATCH_BENCH_RUNS` sets the deployments per scenario (default 5);
//! `DEPLOYWATCH_BENCH_ONLY` (comma-separated parts of scenario names, e.g. `lock,slower`) runs
//! only the scenarios it names; `DEPLOYWATCH_BENCH_EVIDENCE=1` prints every flag a deployment
//! raised (its first and latest message and evidence, as JSON) to stderr when it closes.
//!
//! The workload: 200 distinct statements (40 small tables, five query shapes each) called with
//! Zipf rates (exponent 1.1) by four sessions, about 150 calls a second in all, plus a "work"
//! function (2 ms), an order insert and an account update. The daemon samples every second;
//! `first_hour` 6 s, `first_day` 12 s, `first_week` 18 s. Before each deployment a restoring
//! deployment gives a clean baseline of 8 s, two samples after the previous change was undone
//! (and the lock holder stopped). The change is made at the announcement.

#[allow(dead_code)]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deploywatch::analysis::deployment::{DeploymentView, Finding};
use deploywatch::analysis::window::{Verdict, Window};
use deploywatch_testkit::pgcluster::PgCluster;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use common::scenario::{stray_signals, Hit, Scenario, Subjects, ALL};

const HOUR: u64 = 6;
const BASELINE: u64 = 8;
/// Samples the daemon stores between undoing a deployment's change and the next restoring
/// deployment: two, since the first sample of a baseline covers up to one interval before its
/// deployment.
const SETTLE_SAMPLES: u64 = 2;
const TABLES: usize = 40;
const SHAPES: usize = 5;
const CALLS_PER_SECOND: f64 = 150.0;
const SESSIONS: usize = 4;

const SCHEMA: &str = "
CREATE EXTENSION pg_stat_statements;
CREATE TABLE database_metadata (key text PRIMARY KEY, value text);
INSERT INTO database_metadata VALUES ('version', '1.0.0');
CREATE TABLE lookup (id int PRIMARY KEY, name text);
INSERT INTO lookup SELECT g, 'n' || g FROM generate_series(1, 31) g;
CREATE TABLE items (id bigserial PRIMARY KEY, owner int NOT NULL, v int NOT NULL);
INSERT INTO items (owner, v) SELECT g % 5000, g FROM generate_series(1, 200000) g;
CREATE INDEX items_owner ON items (owner);
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
INSERT INTO accounts SELECT g, 0 FROM generate_series(1, 3) g;
CREATE TABLE parents (id int PRIMARY KEY);
INSERT INTO parents SELECT g FROM generate_series(1, 100) g;
CREATE TABLE children (id serial PRIMARY KEY, parent_id int NOT NULL);
INSERT INTO children (parent_id) SELECT g FROM generate_series(1, 100) g;
CREATE FUNCTION work(f float8) RETURNS void LANGUAGE sql AS $$ SELECT pg_sleep(0.002) $$;
ANALYZE;
";

const PACK: &str = r#"[pack]
name = "e2e"

[[check]]
name = "orphaned_children"
category = "integrity"
severity = "critical"
sql = "SELECT count(*) FROM children c WHERE NOT EXISTS (SELECT 1 FROM parents p WHERE p.id = c.parent_id)"
expect = "== 0"

[[check]]
name = "up"
category = "health"
severity = "info"
sql = "SELECT 1"
expect = "== 1"
"#;

fn create_tables(cluster: &PgCluster) {
    let mut sql = String::new();
    for t in 0..TABLES {
        sql.push_str(&format!(
            "CREATE TABLE t{t} (id int PRIMARY KEY, v int NOT NULL); \
             INSERT INTO t{t} SELECT g, g FROM generate_series(1, 200) g;"
        ));
    }
    // Analysed now, not by autovacuum a minute into the run: the planner's first statistics
    // switch these one-page tables from index scans to sequential scans, a change of plans
    // no deployment made.
    sql.push_str("ANALYZE;");
    cluster.psql("bench", &sql).expect("tables");
}

/// The five shapes on table `t`: distinct query ids in pg_stat_statements.
fn statement(index: usize) -> String {
    let (t, shape) = (index / SHAPES, index % SHAPES);
    match shape {
        0 => format!("SELECT v FROM t{t} WHERE id = $1"),
        1 => format!("SELECT count(*) FROM t{t} WHERE v < $1"),
        2 => format!("SELECT max(v) FROM t{t} WHERE id > $1"),
        3 => format!("SELECT id FROM t{t} WHERE v > $1 ORDER BY id LIMIT 1"),
        _ => format!("SELECT EXISTS (SELECT 1 FROM t{t} WHERE id = $1)"),
    }
}

/// What the workload does; scenarios change it while it runs.
#[derive(Default)]
struct Knobs {
    /// Traffic multiplier, as f64 bits.
    traffic: AtomicU64,
    /// Whether the new statements run.
    new_queries: AtomicBool,
}

/// Statement `i`'s share of the calls.
fn zipf_weights(n: usize) -> Vec<f64> {
    let w: Vec<f64> = (0..n).map(|i| 1.0 / ((i + 1) as f64).powf(1.1)).collect();
    let total: f64 = w.iter().sum();
    w.into_iter().map(|x| x / total).collect()
}

fn pick(weights: &[f64], u: f64) -> usize {
    let mut acc = 0.0;
    for (i, w) in weights.iter().enumerate() {
        acc += w;
        if u < acc {
            return i;
        }
    }
    weights.len() - 1
}

/// One application session: reconnects when the server went away (a restart).
async fn session(url: String, knobs: Arc<Knobs>, cancel: CancellationToken, seed: u64) {
    let all = TABLES * SHAPES;
    // Every request is one transaction: a statement picked by Zipf rank, then the order
    // insert. The first three ranks are the function, the owner lookup (which the index drop
    // hurts) and the account update (which the lock contention hurts); then the 200 table
    // statements.
    let weights = zipf_weights(all + 3);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    'connect: while !cancel.is_cancelled() {
        let Ok((client, connection)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let driver = tokio::spawn(connection);
        loop {
            if cancel.is_cancelled() {
                break 'connect;
            }
            let traffic = f64::from_bits(knobs.traffic.load(Ordering::Relaxed));
            let per_session = CALLS_PER_SECOND * traffic / SESSIONS as f64;
            let gap = -rng.gen_range(f64::EPSILON..1.0f64).ln() / per_session;
            tokio::time::sleep(Duration::from_secs_f64(gap)).await;
            let which = pick(&weights, rng.gen());
            let key: i32 = rng.gen_range(1..=200);
            let read = async {
                match which {
                    0 => client.execute("SELECT work($1)", &[&1.0f64]).await,
                    1 => {
                        client
                            .execute("SELECT count(*) FROM items WHERE owner = $1", &[&(key * 7)])
                            .await
                    }
                    2 => {
                        client
                            .execute(
                                "UPDATE accounts SET balance = balance + 1 WHERE id = $1",
                                &[&(key % 3 + 1)],
                            )
                            .await
                    }
                    n => client.execute(&statement(n - 3), &[&key]).await,
                }
            };
            let v: i32 = rng.gen_range(0..1_000_000);
            let result = async {
                client.batch_execute("BEGIN").await?;
                read.await?;
                client
                    .execute(
                        "INSERT INTO items (owner, v) VALUES ($1, $2)",
                        &[&(key * 7), &v],
                    )
                    .await?;
                client.batch_execute("COMMIT").await
            }
            .await;
            if result.is_err() && !client.is_closed() {
                let _ = client.batch_execute("ROLLBACK").await;
            }
            if knobs.new_queries.load(Ordering::Relaxed) && rng.gen::<f64>() < 0.05 {
                let t: i32 = rng.gen_range(0..TABLES as i32);
                let _ = client
                    .execute(
                        &format!("SELECT v, id FROM t{t} WHERE id BETWEEN $1 AND $1 + 5"),
                        &[&key],
                    )
                    .await;
            }
            if let Err(error) = result {
                if error.is_closed() || client.is_closed() {
                    driver.abort();
                    continue 'connect;
                }
            }
        }
    }
}

/// The real workload's statements, as their texts in a finding's message.
struct Statements;

impl Subjects for Statements {
    fn is_statement(&self, finding: &Finding, hit: Hit) -> bool {
        let needle = match hit {
            Hit::Indexed => "FROM items WHERE owner",
            Hit::Slowed => "work(",
            Hit::Locked => "UPDATE accounts",
        };
        finding.message.contains(needle)
    }

    fn scanned_table(&self) -> String {
        "public.items".into()
    }
}

/// What one deployment showed, the injected regression's looks in seconds since it.
type Outcome = common::scenario::Outcome<f64>;

fn verdict(view: &DeploymentView, window: Window) -> Option<Verdict> {
    view.windows
        .iter()
        .find(|w| w.window == window)
        .map(|w| w.verdict)
}

async fn apply(
    cluster: &mut PgCluster,
    scenario: Scenario,
    knobs: &Knobs,
    lock: &CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let sql = |s: &str| cluster.psql("bench", s).map(|_| ()).expect("change");
    match scenario {
        Scenario::TrafficDouble => knobs.traffic.store(2.0f64.to_bits(), Ordering::Relaxed),
        Scenario::TrafficQuarter => knobs.traffic.store(0.25f64.to_bits(), Ordering::Relaxed),
        Scenario::StatementsReset => sql("SELECT pg_stat_statements_reset()"),
        Scenario::Restart => cluster.restart().expect("restart"),
        Scenario::NewQueries => knobs.new_queries.store(true, Ordering::Relaxed),
        Scenario::Vacuum => {
            sql("VACUUM ANALYZE");
            sql("CHECKPOINT");
        }
        Scenario::IndexDrop => sql("DROP INDEX items_owner"),
        // The same 2 ms sleep, then (f - 1) x 2 ms more of clock time spent in a loop of
        // plain expressions (no statement of its own in `pg_stat_statements`): a longer
        // `pg_sleep` is not f times slower (its wake-up rounds up to whole milliseconds, so
        // 3 ms took about 4, and "1.5x" measured +88 %).
        Scenario::Slower(f) => sql(&format!(
            "CREATE OR REPLACE FUNCTION spin(s float8) RETURNS void LANGUAGE plpgsql AS $$ \
             DECLARE until timestamptz := clock_timestamp() + make_interval(secs => s); \
             BEGIN WHILE clock_timestamp() < until LOOP END LOOP; END $$; \
             CREATE OR REPLACE FUNCTION work(f float8) RETURNS void LANGUAGE sql AS \
             $$ SELECT pg_sleep(0.002), spin({}) $$",
            0.002 * (f - 1.0)
        )),
        Scenario::FailingConstraint => {
            sql("ALTER TABLE items ADD CONSTRAINT v_not_7 CHECK (v % 7 <> 0) NOT VALID")
        }
        Scenario::LockContention => {
            // Another session holds the rows the update needs for 150 ms out of every 500.
            let url = cluster.connection_string("bench");
            let lock = lock.clone();
            return Some(tokio::spawn(async move {
                let Ok((client, connection)) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                else {
                    return;
                };
                let driver = tokio::spawn(connection);
                while !lock.is_cancelled() {
                    let _ = client
                        .batch_execute(
                            "BEGIN; SELECT * FROM accounts FOR UPDATE; SELECT pg_sleep(0.15); COMMIT",
                        )
                        .await;
                    tokio::select! {
                        _ = lock.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_millis(350)) => {}
                    }
                }
                driver.abort();
            }));
        }
        Scenario::Integrity(_) | Scenario::NoChange => {}
    }
    None
}

fn undo(cluster: &PgCluster, scenario: Scenario, knobs: &Knobs) {
    knobs.traffic.store(1.0f64.to_bits(), Ordering::Relaxed);
    knobs.new_queries.store(false, Ordering::Relaxed);
    let sql = |s: &str| cluster.psql("bench", s).map(|_| ()).expect("undo");
    match scenario {
        Scenario::IndexDrop => sql("CREATE INDEX items_owner ON items (owner)"),
        Scenario::Slower(_) => sql(
            "CREATE OR REPLACE FUNCTION work(f float8) RETURNS void LANGUAGE sql AS $$ SELECT pg_sleep(0.002) $$",
        ),
        Scenario::FailingConstraint => sql("ALTER TABLE items DROP CONSTRAINT v_not_7"),
        Scenario::Integrity(_) => {
            sql("INSERT INTO parents SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM parents WHERE id = 1)")
        }
        _ => {}
    }
}

async fn run_one(
    daemon: &common::BenchDaemon,
    cluster: &mut PgCluster,
    knobs: &Knobs,
    scenario: Scenario,
    version: &mut u32,
) -> Outcome {
    *version += 1;
    common::announce(daemon, &format!("1.0.{version}"), "restore").await;
    tokio::time::sleep(Duration::from_secs(BASELINE)).await;
    *version += 1;
    let to_version = format!("1.0.{version}");
    let lock = CancellationToken::new();
    let holding = apply(cluster, scenario, knobs, &lock).await;
    let announced = Instant::now();
    common::announce(daemon, &to_version, scenario.name().as_str()).await;
    let violation_at = match scenario {
        Scenario::Integrity(Window::FirstHour) => Some(1.0),
        Scenario::Integrity(Window::FirstDay) => Some(HOUR as f64 + 1.0),
        Scenario::Integrity(_) => Some(2.0 * HOUR as f64 + 1.0),
        _ => None,
    };
    let mut violated = false;
    let mut outcome = Outcome::default();
    let deadline = announced + Duration::from_secs(HOUR * 3 + 30);
    loop {
        let elapsed = announced.elapsed().as_secs_f64();
        if let Some(at) = violation_at {
            if !violated && elapsed >= at {
                cluster
                    .psql("bench", "DELETE FROM parents WHERE id = 1")
                    .expect("violation");
                violated = true;
            }
        }
        let view = daemon
            .handle
            .state
            .snapshot()
            .deployments
            .get("bench")
            .cloned()
            .filter(|v| v.to_version == to_version);
        if let Some(view) = view {
            for w in &view.windows {
                for f in w.regressions.iter().filter(|f| f.active()) {
                    outcome.published = true;
                    outcome.paged |= f.confirmed();
                    if scenario.is_the_regression(f, &Statements) {
                        let since = elapsed - violation_at.unwrap_or(0.0);
                        outcome.first_published.get_or_insert(since);
                        outcome.window.get_or_insert(w.window);
                        if f.confirmed() {
                            outcome.first_confirmed.get_or_insert(since);
                        }
                    } else if !outcome.stray.contains(&f.signal) {
                        outcome.stray.push(f.signal);
                    }
                }
            }
            let closed = verdict(&view, Window::FirstWeek).is_some_and(|v| v != Verdict::Watching);
            if closed {
                outcome.final_regression = view
                    .windows
                    .iter()
                    .any(|w| w.verdict == Verdict::Regression);
                if common::setting("DEPLOYWATCH_BENCH_EVIDENCE", 0u8) != 0 {
                    for w in &view.windows {
                        for f in &w.regressions {
                            eprintln!(
                                "{} {to_version} {:?} {:?}: {}",
                                scenario.name(),
                                w.window,
                                w.verdict,
                                serde_json::to_string(f).unwrap_or_default()
                            );
                        }
                    }
                }
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "first_week of {to_version} never closed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The lock holder's transaction in flight ends before the change is undone, and the next
    // restoring deployment comes `SETTLE_SAMPLES` samples later: its baseline, which the next
    // deployment is judged against, must not see this one's change.
    lock.cancel();
    if let Some(holding) = holding {
        // A holder stuck in a statement is given up on after 5 s.
        let abort = holding.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), holding)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    undo(cluster, scenario, knobs);
    common::wait_for_samples(daemon, SETTLE_SAMPLES, Duration::from_secs(10)).await;
    outcome
}

fn median(values: &mut [f64]) -> String {
    if values.is_empty() {
        return "-".into();
    }
    values.sort_by(f64::total_cmp);
    format!("{:.1} s", values[values.len() / 2])
}

async fn run() {
    let runs: usize = common::setting("DEPLOYWATCH_BENCH_RUNS", 5);
    let mut cluster = common::cluster_with_statements("bench");
    cluster.psql("bench", SCHEMA).expect("schema");
    create_tables(&cluster);
    let url = cluster.connection_string("bench");
    let knobs = Arc::new(Knobs::default());
    knobs.traffic.store(1.0f64.to_bits(), Ordering::Relaxed);
    let cancel = CancellationToken::new();
    let sessions: Vec<_> = (0..SESSIONS)
        .map(|i| {
            tokio::spawn(session(
                url.clone(),
                knobs.clone(),
                cancel.clone(),
                i as u64 + 1,
            ))
        })
        .collect();
    let daemon = common::start(&cluster, "bench", "e2e.toml", PACK, HOUR).await;
    tokio::time::sleep(Duration::from_secs(BASELINE)).await;
    let started = Instant::now();
    let mut version = 0;
    let mut harmless_rows = Vec::new();
    let mut injected_rows = Vec::new();
    let only: String = common::setting("DEPLOYWATCH_BENCH_ONLY", String::new());
    let chosen = |scenario: &Scenario| {
        only.is_empty()
            || only
                .split(',')
                .any(|part| scenario.name().contains(part.trim()))
    };
    for scenario in ALL.into_iter().filter(chosen) {
        let mut outcomes = Vec::new();
        for _ in 0..runs {
            outcomes.push(run_one(&daemon, &mut cluster, &knobs, scenario, &mut version).await);
        }
        let count = |f: &dyn Fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
        let stray = stray_signals(&outcomes);
        if scenario.harmless() {
            harmless_rows.push(format!(
                "| {} | {runs} | {} | {} | {} | {stray} |",
                scenario.name(),
                count(&|o| o.published),
                count(&|o| o.paged),
                count(&|o| o.final_regression)
            ));
        } else {
            let mut publish: Vec<f64> = outcomes.iter().filter_map(|o| o.first_published).collect();
            let mut confirm: Vec<f64> = outcomes.iter().filter_map(|o| o.first_confirmed).collect();
            injected_rows.push(format!(
                "| {} | {runs} | {} | {} | {} | {} | {} of {runs} | {stray} |",
                scenario.name(),
                count(&|o| o.first_published.is_some()),
                count(&|o| o.first_confirmed.is_some()),
                median(&mut publish),
                median(&mut confirm),
                count(&|o| o.window == Some(scenario.starts_in())),
            ));
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    cancel.cancel();
    for s in sessions {
        let _ = s.await;
    }
    daemon.stop().await;
    drop(cluster);
    println!("## Evaluation end to end on a real PostgreSQL\n");
    println!(
        "{runs} deployments per scenario; 200 statements with Zipf call rates (about \
         {CALLS_PER_SECOND} calls/s from {SESSIONS} sessions); sampling every second; \
         `first_hour` {HOUR} s, `first_day` {} s, `first_week` {} s; {BASELINE} s of baseline \
         before each deployment; {elapsed:.0} s in all.\n",
        HOUR * 2,
        HOUR * 3
    );
    println!("| harmless change | deployments | flag published | paged (confirmed) | final regression | signals that fired |\n| --- | --- | --- | --- | --- | --- |");
    for row in harmless_rows {
        println!("{row}");
    }
    println!();
    println!("| injected regression | deployments | published | confirmed | median time to publish | median time to confirm | flagged in the window where it starts | other signals that fired |\n| --- | --- | --- | --- | --- | --- | --- | --- |");
    for row in injected_rows {
        println!("{row}");
    }
    println!();
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(run());
}
