//! The state store's operations, the same on both backends: an SQLite file and a PostgreSQL
//! database (`store.url`, real PostgreSQL started by the harness). Then what only the shared
//! store has: its schema created once and versioned, the role it needs, a second replica
//! reading what the first wrote, and a store that goes away and comes back.

mod common;

use std::collections::BTreeMap;

use deploywatch::analysis::deployment::{DeploymentKind, Detection, Finding};
use deploywatch::analysis::sample::{
    CheckPoint, DbCounters, IndexDelta, Sample, StatementDelta, TableCounters,
};
use deploywatch::analysis::window::{Verdict, Window};
use deploywatch::checks::incremental::Progress;
use deploywatch::storage::incremental;
use deploywatch::storage::{PgSettings, Store, StoreError, VerdictRecord, PRUNE_BATCH};
use deploywatch_testkit::pgcluster::PgCluster;

/// A PostgreSQL store in a fresh database `name` of `cluster`, as the bootstrap superuser.
fn pg_store(cluster: &PgCluster, name: &str) -> Store {
    cluster.create_database(name).expect("database");
    pg_store_as(cluster, name, "postgres")
}

fn pg_store_as(cluster: &PgCluster, name: &str, user: &str) -> Store {
    let url = format!("postgres://{user}@127.0.0.1:{}/{name}", cluster.port());
    Store::postgres(PgSettings::parse(&url, None).expect("url"))
}

/// Calls `probe` until it gives a value, for at most 30 seconds. (The store's calls block,
/// so this test runs without an async runtime.)
fn poll<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Runs `scenario` on an SQLite store and on a PostgreSQL store.
fn on_both(scenario: impl Fn(&Store)) {
    let dir = tempfile::tempdir().expect("tempdir");
    scenario(&Store::open(&dir.path().join("state.sqlite")).expect("sqlite store"));
    let cluster = common::bare_cluster();
    scenario(&pg_store(&cluster, "store"));
}

fn statement(calls: f64, total_ms: f64, query: &str) -> StatementDelta {
    StatementDelta {
        calls,
        total_ms,
        rows: calls,
        query: query.to_string(),
    }
}

fn full_sample(at: f64) -> Sample {
    let mut statements = BTreeMap::new();
    statements.insert(
        "-9123456789012".to_string(),
        statement(20.0, 31.5, "SELECT * FROM submissions WHERE id = $1"),
    );
    statements.insert("17".to_string(), statement(3.0, 0.75, "SELECT 1"));
    let mut sample = Sample {
        at,
        seconds: 60.0,
        database: Some(DbCounters {
            xact_commit: 1200.0,
            xact_rollback: 4.0,
            deadlocks: 1.0,
            blks_hit: 123_456.0,
            temp_bytes: 8.0e9,
            ..DbCounters::default()
        }),
        statements: Some(statements),
        size_bytes: 123_456_789.0,
        connections: 12.0,
        max_connections: 100.0,
        resets: vec!["pg_stat_user_tables".to_string()],
        statements_available: true,
        ..Sample::default()
    };
    sample.indexes.insert(
        "public.idx_new".into(),
        IndexDelta {
            table: "public.t".into(),
            scans: 0.0,
        },
    );
    sample.tables.insert(
        "public.t".into(),
        TableCounters {
            seq_scan: 2.0,
            seq_tup_read: 400.0,
            idx_scan: 9.0,
        },
    );
    sample.checks.insert(
        "orphans".into(),
        CheckPoint {
            category: "integrity".into(),
            status: "fail".into(),
            value: Some(3.0),
        },
    );
    sample
}

fn verdict(window: Window, verdict: Verdict, closed_at: f64) -> VerdictRecord {
    VerdictRecord {
        window,
        verdict,
        samples: 3,
        regressions: Vec::<Finding>::new(),
        improvements: vec![],
        closed_at,
    }
}

#[test]
fn samples_and_query_texts_read_back_as_written() {
    on_both(|store| {
        let sample = full_sample(1000.0);
        store.add_sample("t", &sample).expect("add");
        store.add_sample("t", &full_sample(1060.0)).expect("add");
        assert_eq!(store.samples("t", 0.0, 1060.0).expect("read"), vec![sample]);
        assert!(store
            .samples("other", 0.0, 2000.0)
            .expect("read")
            .is_empty());
        assert_eq!(store.sample_count("t", 0.0, 2000.0).expect("count"), 2);
        let last = store.last_sample_before("t", 2000.0).expect("last");
        assert_eq!(last.map(|s| s.at), Some(1060.0));
        assert_eq!(
            store.query_texts("t").get("17").map(String::as_str),
            Some("SELECT 1")
        );
        // A text learned later replaces a missing one.
        let mut later = full_sample(1120.0);
        if let Some(statements) = later.statements.as_mut() {
            statements.insert("99".into(), statement(5.0, 5.0, ""));
        }
        store.add_sample("t", &later).expect("add");
        store
            .add_query_texts("t", &[("99".into(), "SELECT 99".into())], 1130.0)
            .expect("texts");
        let read = store.samples("t", 1100.0, 2000.0).expect("read");
        assert_eq!(
            read[0].statements.as_ref().expect("statements")["99"].query,
            "SELECT 99"
        );
        let mut seen = 0;
        store
            .each_sample("t", 0.0, 2000.0, |_| seen += 1)
            .expect("each");
        assert_eq!(seen, 3);
        assert!(store.size_bytes().expect("size") > 0);
        store.check_integrity().expect("sound");
    });
}

#[test]
fn deployments_verdicts_and_versions_are_kept() {
    on_both(|store| {
        assert_eq!(store.last_version("t").expect("version"), None);
        store.set_last_version("t", "3.6.0", 5.0).expect("version");
        store.set_last_version("t", "3.7.0", 6.0).expect("version");
        assert_eq!(
            store.last_version("t").expect("version").as_deref(),
            Some("3.7.0")
        );
        let first = store
            .add_deployment(
                "t",
                Some("3.6.0"),
                "3.7.0",
                DeploymentKind::Deploy,
                Detection::VersionChange,
                20.0,
                None,
                None,
            )
            .expect("deployment");
        let second = store
            .add_deployment(
                "t",
                Some("3.7.0"),
                "3.6.0",
                DeploymentKind::Rollback,
                Detection::Announced,
                40.0,
                Some(45.0),
                Some("undo"),
            )
            .expect("deployment");
        assert_ne!(first.id, second.id);
        assert_eq!(store.rollback_count("t").expect("rollbacks"), 1);
        assert_eq!(
            store.latest_deployment("t").expect("latest"),
            Some(second.clone())
        );
        assert_eq!(store.deployments(None).expect("all").len(), 2);
        assert_eq!(
            store
                .next_deployment("t", first.at, first.id)
                .expect("next"),
            Some(second.clone())
        );
        assert_eq!(
            store
                .next_deployment("t", second.at, second.id)
                .expect("next"),
            None
        );
        assert_eq!(
            store.previous_deployment_time("t", 30.0).expect("previous"),
            Some(20.0)
        );
        assert_eq!(
            store.previous_deployment_time("t", 10.0).expect("previous"),
            None
        );
        let moved = store
            .update_deployment(first.id, 18.0, None, Some("announced"))
            .expect("update")
            .expect("still there");
        assert_eq!((moved.at, moved.note.as_deref()), (18.0, Some("announced")));
        store
            .set_verdict(first.id, &verdict(Window::FirstDay, Verdict::Pass, 90.0))
            .expect("verdict");
        store
            .set_verdict(first.id, &verdict(Window::FirstHour, Verdict::Pass, 30.0))
            .expect("verdict");
        // A verdict recorded again replaces the first.
        store
            .set_verdict(
                first.id,
                &verdict(Window::FirstHour, Verdict::Regression, 31.0),
            )
            .expect("verdict");
        let verdicts = store.verdicts(first.id).expect("verdicts");
        let windows: Vec<_> = verdicts.iter().map(|v| (v.window, v.verdict)).collect();
        assert_eq!(
            windows,
            vec![
                (Window::FirstHour, Verdict::Regression),
                (Window::FirstDay, Verdict::Pass)
            ]
        );
        assert!(store.verdicts(second.id).expect("verdicts").is_empty());
    });
}

#[test]
fn pruning_goes_in_small_batches() {
    on_both(|store| {
        for i in 0..PRUNE_BATCH + 30 {
            let sample = Sample {
                at: i as f64,
                ..Sample::default()
            };
            store.add_sample("t", &sample).expect("add");
        }
        assert_eq!(store.prune(1e9).expect("prune"), PRUNE_BATCH);
        assert_eq!(store.prune(1e9).expect("prune"), 30);
        assert_eq!(store.prune(1e9).expect("prune"), 0);
    });
}

#[test]
fn incremental_progress_is_kept_per_target_and_check() {
    on_both(|store| {
        assert_eq!(incremental::load(store, "a", "c").expect("load"), None);
        let progress = Progress {
            last_complete_at: Some(12.0),
            ..Progress::default()
        };
        incremental::save(store, "a", "c", "f1", &Progress::default(), 1.0).expect("save");
        incremental::save(store, "a", "c", "f2", &progress, 2.0).expect("save again");
        assert_eq!(
            incremental::load(store, "a", "c").expect("load"),
            Some(("f2".to_string(), progress))
        );
        assert_eq!(incremental::load(store, "b", "c").expect("load"), None);
    });
}

#[test]
fn a_shared_store_is_created_once_versioned_and_read_by_every_replica() {
    let cluster = common::bare_cluster();
    cluster.create_database("shared").expect("database");
    // Two replicas starting at once create the schema once, under the advisory lock.
    let stores: Vec<Store> = (0..2)
        .map(|_| pg_store_as(&cluster, "shared", "postgres"))
        .collect();
    std::thread::scope(|scope| {
        for store in &stores {
            scope.spawn(|| store.connect().expect("connect"));
        }
    });
    let versions = cluster
        .psql(
            "shared",
            "SELECT count(*), max(version) FROM deploywatch.schema_version",
        )
        .expect("versions");
    assert_eq!(versions.trim(), "1|1", "one version row");
    // What one replica writes (new series included), the other reads.
    stores[0].add_sample("t", &full_sample(100.0)).expect("add");
    let mut other = full_sample(160.0);
    if let Some(statements) = other.statements.as_mut() {
        statements.insert("42".into(), statement(1.0, 2.0, "SELECT 42"));
    }
    stores[1]
        .add_sample("t", &other)
        .expect("add on the other replica");
    for store in &stores {
        let read = store.samples("t", 0.0, 1000.0).expect("read");
        assert_eq!(read, vec![full_sample(100.0), other.clone()]);
        assert_eq!(
            store.query_texts("t").get("42").map(String::as_str),
            Some("SELECT 42")
        );
    }
    // A layout written by a newer deploywatch is refused, not overwritten.
    cluster
        .psql(
            "shared",
            "INSERT INTO deploywatch.schema_version (version) VALUES (99)",
        )
        .expect("newer");
    let error = refused(&cluster, "shared", "postgres");
    assert!(error.contains("newer"), "{error}");
}

/// Why the store on database `db` of `cluster` as `role` refuses to connect.
fn refused(cluster: &PgCluster, db: &str, role: &str) -> String {
    let store = pg_store_as(cluster, db, role);
    store.connect().expect_err("refused").to_string()
}

#[test]
fn a_role_with_create_on_a_precreated_schema_is_enough() {
    let cluster = common::bare_cluster();
    cluster.create_database("owned").expect("database");
    cluster
        .psql(
            "owned",
            "CREATE ROLE dwstore LOGIN; REVOKE CREATE ON SCHEMA public FROM PUBLIC; \
             REVOKE CREATE ON DATABASE owned FROM PUBLIC; \
             CREATE SCHEMA deploywatch AUTHORIZATION dwstore",
        )
        .expect("role");
    let store = pg_store_as(&cluster, "owned", "dwstore");
    store
        .connect()
        .expect("the schema's owner creates the tables");
    store.add_sample("t", &full_sample(1.0)).expect("add");
    assert_eq!(store.sample_count("t", 0.0, 10.0).expect("count"), 1);
    // Without the schema and without CREATE on the database, it says so.
    cluster.create_database("bare").expect("database");
    cluster
        .psql("bare", "REVOKE CREATE ON DATABASE bare FROM PUBLIC")
        .expect("revoke");
    let error = refused(&cluster, "bare", "dwstore");
    assert!(error.contains("permission denied"), "{error}");
}

#[test]
fn a_store_that_goes_away_fails_fast_and_is_used_again_when_back() {
    let mut cluster = common::bare_cluster();
    let store = pg_store(&cluster, "away");
    store.add_sample("t", &full_sample(1.0)).expect("add");
    cluster.stop().expect("stop");
    let error = store
        .add_sample("t", &full_sample(2.0))
        .expect_err("unreachable");
    assert!(error.is_unreachable(), "{error}");
    let again = store.sample_count("t", 0.0, 10.0).expect_err("still away");
    assert!(matches!(again, StoreError::Unreachable(_)), "{again}");
    cluster.start_again().expect("start");
    let count = poll("the store answers again", || {
        store.sample_count("t", 0.0, 10.0).ok()
    });
    assert_eq!(count, 1, "what was recorded before is kept");
    store.add_sample("t", &full_sample(3.0)).expect("add again");
    assert_eq!(store.sample_count("t", 0.0, 10.0).expect("count"), 2);
}

#[test]
fn one_replica_leads_a_target_and_only_its_writes_are_made() {
    use deploywatch::storage::Lead;
    let cluster = common::bare_cluster();
    cluster.create_database("lead").expect("database");
    let replica = |name: &str| {
        let url = format!("postgres://postgres@127.0.0.1:{}/lead", cluster.port());
        let mut settings = PgSettings::parse(&url, None).expect("url");
        settings.replica = name.to_string();
        Store::postgres(settings)
    };
    let (a, b) = (replica("deploywatch a"), replica("deploywatch b"));
    assert_eq!(
        a.lead("t").expect("lead"),
        Lead::Leading { took_over: true }
    );
    assert_eq!(
        a.lead("t").expect("lead"),
        Lead::Leading { took_over: false }
    );
    assert_eq!(
        b.lead("t").expect("lead"),
        Lead::Following {
            leader: Some("deploywatch a".into())
        }
    );
    // Another target is another lock.
    assert_eq!(
        b.lead("u").expect("lead"),
        Lead::Leading { took_over: true }
    );
    a.fenced("t", |s| s.add_sample("t", &full_sample(1.0)))
        .expect("the leader writes");
    let refused = b.fenced("t", |s| s.add_sample("t", &full_sample(2.0)));
    assert!(
        matches!(refused, Err(StoreError::NotLeader(_))),
        "{refused:?}"
    );
    // An announcement is recorded by any replica, serialised with the others.
    b.serialized("t", |s| s.set_last_version("t", "3.7.0", 3.0))
        .expect("any replica records");
    assert_eq!(a.sample_count("t", 0.0, 10.0).expect("count"), 1);
    // The leader's session ends (a replica killed): the other takes over at its next try,
    // and the old leader, were it still running, writes nothing more.
    cluster
        .psql(
            "postgres",
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'deploywatch a'",
        )
        .expect("terminate");
    poll("the other replica leads", || {
        (b.lead("t").ok()? == Lead::Leading { took_over: true }).then_some(())
    });
    let fenced = a.fenced("t", |s| s.add_sample("t", &full_sample(4.0)));
    assert!(
        fenced.is_err(),
        "the old leader's write is refused: {fenced:?}"
    );
    poll(
        "the old leader follows once its store answers again",
        || matches!(a.lead("t").ok()?, Lead::Following { .. }).then_some(()),
    );
    b.fenced("t", |s| s.add_sample("t", &full_sample(5.0)))
        .expect("the new leader writes");
    assert_eq!(b.sample_count("t", 0.0, 10.0).expect("count"), 2);
}

#[test]
fn the_report_reads_a_postgresql_store() {
    let cluster = common::bare_cluster();
    let store = pg_store(&cluster, "reported");
    store
        .add_sample("cognit", &full_sample(100.0))
        .expect("sample");
    store
        .add_deployment(
            "cognit",
            Some("3.6.0"),
            "3.7.0",
            DeploymentKind::Deploy,
            Detection::Announced,
            150.0,
            None,
            Some("payments index"),
        )
        .expect("deployment");
    store
        .add_sample("cognit", &full_sample(200.0))
        .expect("sample");
    let dir = common::ConfigDir::new();
    dir.add_shipped_pack("postgres.toml");
    dir.write(
        "deploywatch.toml",
        &format!(
            "[store]\nurl = \"postgres://postgres@127.0.0.1:{}/reported\"\n\n\
             [[targets]]\nname = \"cognit\"\nhost = \"127.0.0.1\"\n",
            cluster.port()
        ),
    );
    let (code, text) = deploywatch::commands::report(&dir.load(), Some("cognit"), None);
    assert_eq!(code, deploywatch::commands::EXIT_OK, "{text}");
    assert!(text.contains("3.7.0"), "{text}");
}
