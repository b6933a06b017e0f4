//! Two replicas on one PostgreSQL store (`store.url`) for one target: exactly one samples and
//! judges it at a time, deployments and verdicts are recorded once, the other takes over
//! within a sampling interval when the leader is killed, and a store that goes away stops
//! neither replica's checks nor its metrics. Real PostgreSQL for the target and the store, real
//! daemon processes; windows compressed to seconds as in `tests/deployments.rs`.

mod common;

use std::time::{Duration, Instant};

use common::{cognit_cluster, parse_metrics, wait_until, ConfigDir, Version};
use deploywatch_testkit::config::compressed_clock;
use deploywatch_testkit::pgcluster::PgCluster;

const TOKEN: &str = "ha-token";
/// The sampling interval of both replicas, in seconds.
const INTERVAL: u64 = 1;

/// The target's cluster (cognit), the store's cluster, and the replicas' shared configuration.
struct Pair {
    target: PgCluster,
    store: PgCluster,
    /// The main configuration file's text.
    main: String,
    dir: ConfigDir,
}

impl Pair {
    /// Windows of `hour`, `2 * hour` and `3 * hour` seconds.
    fn new(version: Version, hour: u32) -> Pair {
        let target = cognit_cluster(version);
        let store = common::bare_cluster();
        store.create_database("dwstore").expect("store database");
        let store_url = format!(
            "url = \"postgres://postgres@127.0.0.1:{}/dwstore\"",
            store.port()
        );
        let main = compressed_clock(
            "cognit",
            target.port(),
            Some(&store_url),
            INTERVAL,
            hour.into(),
        );
        let dir = Self::config_dir(&main);
        Pair {
            target,
            store,
            main,
            dir,
        }
    }

    /// A configuration directory with the shipped pack, the token and `main`.
    fn config_dir(main: &str) -> ConfigDir {
        let dir = ConfigDir::new();
        dir.add_shipped_pack("cognit-3.7.0.toml");
        dir.write("token", TOKEN);
        dir.write("deploywatch.toml", main);
        dir
    }

    fn spawn(&self) -> Replica {
        Replica::spawn(&self.dir)
    }

    /// One number from the store (psql's unaligned output).
    fn store_count(&self, sql: &str) -> i64 {
        let out = self.store.psql("dwstore", sql).expect("store query");
        out.lines()
            .find_map(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("no count in {out:?}"))
    }

    /// Waits until the store holds `n` samples: a baseline either replica can judge against.
    async fn wait_baseline(&self, n: i64) {
        self.wait_samples("a baseline in the store", 60, |stored| stored >= n)
            .await;
    }

    /// Waits at most `seconds` until the number of samples in the store is `enough`.
    async fn wait_samples(&self, what: &str, seconds: u64, enough: impl Fn(i64) -> bool) {
        wait_until(what, Duration::from_secs(seconds), || async {
            enough(self.store_count("SELECT count(*) FROM deploywatch.samples")).then_some(())
        })
        .await;
    }
}

struct Replica {
    port: u16,
    child: tokio::process::Child,
}

impl Replica {
    fn spawn(dir: &ConfigDir) -> Replica {
        let port = common::free_port();
        Replica {
            port,
            child: common::spawn_daemon(dir, port),
        }
    }

    fn kill_9(&mut self) {
        std::process::Command::new("kill")
            .args(["-9", &self.child.id().expect("pid").to_string()])
            .status()
            .expect("kill -9");
    }
}

async fn metrics(port: u16) -> Option<String> {
    let (code, body) = common::get_or_none(&format!("http://127.0.0.1:{port}/metrics")).await?;
    (code == 200).then_some(body)
}

/// `deploywatch_target_leader{target="cognit"}` of a replica, once it has one.
async fn leader_gauge(port: u16) -> Option<f64> {
    let body = metrics(port).await?;
    parse_metrics(&body)
        .metric("deploywatch_target_leader")
        .label("target", "cognit")
        .value_opt()
}

async fn status(port: u16) -> Option<serde_json::Value> {
    common::get_json(&format!("http://127.0.0.1:{port}/status")).await
}

async fn announce(port: u16, version: &str) -> u16 {
    let body = serde_json::json!({ "target": "cognit", "version": version }).to_string();
    deploywatch::commands::client::request(
        hyper::Method::POST,
        &format!("http://127.0.0.1:{port}/api/deployments"),
        "application/json",
        Some(TOKEN),
        Some(body),
    )
    .await
    .map(|(code, _)| code.as_u16())
    .unwrap_or(0)
}

/// Waits until exactly one of the replicas leads; returns its index.
async fn one_leader(replicas: &[&Replica]) -> usize {
    let ports: Vec<u16> = replicas.iter().map(|r| r.port).collect();
    wait_until(
        "one replica leads, the other follows",
        Duration::from_secs(60),
        || async {
            let mut gauges = Vec::new();
            for port in &ports {
                gauges.push(leader_gauge(*port).await?);
            }
            let leaders: Vec<usize> = (0..gauges.len()).filter(|i| gauges[*i] == 1.0).collect();
            let followers = gauges.iter().filter(|g| **g == 0.0).count();
            (leaders.len() == 1 && followers == gauges.len() - 1).then(|| leaders[0])
        },
    )
    .await
}

/// The replica's view of cognit's deployment, once `accept` holds.
async fn deployment_where(
    port: u16,
    what: &str,
    deadline: Duration,
    accept: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let accept = &accept;
    wait_until(what, deadline, || async move {
        let s = status(port).await?;
        let d = s["targets"][0]["deployment"].clone();
        (d["id"].is_number() && accept(&d)).then_some(d)
    })
    .await
}

fn window<'a>(d: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    d["windows"]
        .as_array()?
        .iter()
        .find(|w| w["window"] == name)
}

fn closed(d: &serde_json::Value, name: &str) -> bool {
    window(d, name).is_some_and(|w| w["verdict"].is_string() && w["verdict"] != "watching")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_deployment_is_recorded_once_with_one_verdict_per_window() {
    let pair = Pair::new(Version::V360, 6);
    let a = pair.spawn();
    let b = pair.spawn();
    let replicas = [&a, &b];
    let first = one_leader(&replicas).await;
    let (leader, follower) = (replicas[first], replicas[1 - first]);
    pair.wait_baseline(6).await;
    // The pipeline announces to the follower (a Service picks either), and the migration
    // runs, which the leader detects: still one deployment.
    assert_eq!(announce(follower.port, "3.7.0").await, 201);
    common::migrate(&pair.target, "cognit").expect("migration");
    deployment_where(
        leader.port,
        "the leader sees the deployment",
        Duration::from_secs(20),
        |d| d["to_version"] == "3.7.0",
    )
    .await;
    let again = announce(leader.port, "3.7.0").await;
    assert!(again == 200 || again == 201, "merged: {again}");
    let view = deployment_where(
        leader.port,
        "every window closed on the leader",
        Duration::from_secs(60),
        |d| {
            ["first_hour", "first_day", "first_week"]
                .iter()
                .all(|w| closed(d, w))
        },
    )
    .await;
    assert_eq!(view["to_version"], "3.7.0", "{view:#}");
    assert_eq!(
        pair.store_count("SELECT count(*) FROM deploywatch.deployments"),
        1,
        "one deployment row"
    );
    assert_eq!(
        pair.store_count("SELECT count(*) FROM deploywatch.verdicts"),
        3,
        "one verdict per window"
    );
    assert_eq!(
        pair.store_count("SELECT count(DISTINCT \"window\") FROM deploywatch.verdicts"),
        3
    );
    // Only the leader shows the deployment's series; the follower says who leads.
    let leader_metrics = metrics(leader.port).await.expect("leader metrics");
    let follower_metrics = metrics(follower.port).await.expect("follower metrics");
    let verdicts = |body: &str| {
        parse_metrics(body)
            .metric("deploywatch_window_verdict")
            .label("target", "cognit")
            .samples()
            .len()
    };
    assert!(verdicts(&leader_metrics) > 0, "{leader_metrics}");
    assert_eq!(verdicts(&follower_metrics), 0, "{follower_metrics}");
    let s = status(follower.port).await.expect("status");
    let leadership = &s["targets"][0]["leadership"];
    assert_eq!(leadership["leading"], false, "{s:#}");
    assert!(
        leadership["leader"]
            .as_str()
            .is_some_and(|l| l.starts_with("deploywatch")),
        "the follower names the leader: {s:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_mid_first_hour_hands_the_target_over_within_an_interval() {
    let pair = Pair::new(Version::V370, 12);
    let mut a = pair.spawn();
    let mut b = pair.spawn();
    let first = one_leader(&[&a, &b]).await;
    let (leader, follower) = if first == 0 {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    pair.wait_baseline(6).await;
    assert_eq!(announce(leader.port, "3.7.1").await, 201);
    let before = deployment_where(
        leader.port,
        "first_hour under way with a baseline",
        Duration::from_secs(30),
        |d| d["current_window"] == "first_hour" && d["baseline_samples"].as_u64() >= Some(4),
    )
    .await;
    leader.kill_9();
    let killed = Instant::now();
    // Two sampling intervals plus slack for the store server to see the session end.
    wait_until(
        "the follower leads",
        Duration::from_secs(2 * INTERVAL + 3),
        || async { (leader_gauge(follower.port).await == Some(1.0)).then_some(()) },
    )
    .await;
    let took = killed.elapsed();
    let after = deployment_where(
        follower.port,
        "the deployment on the new leader",
        Duration::from_secs(10),
        |_| true,
    )
    .await;
    assert_eq!(after["id"], before["id"], "{before:#}\n{after:#}");
    assert_eq!(after["at"], before["at"]);
    assert!(
        after["baseline_samples"].as_u64() >= before["baseline_samples"].as_u64(),
        "the baseline is kept: {before:#}\n{after:#}"
    );
    let hour_end = window(&before, "first_hour").expect("first_hour")["end"].clone();
    assert_eq!(
        window(&after, "first_hour").expect("first_hour")["end"],
        hour_end
    );
    let closed_view = deployment_where(
        follower.port,
        "first_hour closes on the new leader",
        Duration::from_secs(30),
        |d| closed(d, "first_hour"),
    )
    .await;
    let verdict = window(&closed_view, "first_hour").expect("first_hour")["verdict"].clone();
    assert!(
        matches!(
            verdict.as_str(),
            Some("pass" | "regression" | "inconclusive")
        ),
        "{closed_view:#}"
    );
    // On time: recorded within a few sampling passes of the window's end.
    let end = deploywatch::time::parse_rfc3339(hour_end.as_str().expect("end")).expect("time");
    let closed_at = pair.store_count(
        "SELECT floor(closed_at)::bigint FROM deploywatch.verdicts WHERE \"window\" = 'first_hour'",
    ) as f64;
    assert!(
        closed_at >= end.floor() && closed_at <= end + 3.0 * INTERVAL as f64,
        "first_hour ended at {end} and was closed at {closed_at}"
    );
    assert_eq!(
        pair.store_count("SELECT count(*) FROM deploywatch.deployments"),
        1
    );
    assert_eq!(
        pair.store_count(
            "SELECT count(*) FROM deploywatch.verdicts WHERE \"window\" = 'first_hour'"
        ),
        1
    );
    eprintln!("takeover after the kill: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_away_for_a_while_stops_no_check_and_loses_nothing() {
    let mut pair = Pair::new(Version::V370, 600);
    let a = pair.spawn();
    let b = pair.spawn();
    one_leader(&[&a, &b]).await;
    assert_eq!(announce(a.port, "3.7.1").await, 201);
    pair.wait_samples("samples in the store", 60, |stored| stored >= 5)
        .await;
    pair.store.stop().expect("store down");
    let runs = |body: &str| {
        parse_metrics(body)
            .metric("deploywatch_check_runs_total")
            .label("target", "cognit")
            .sum()
    };
    for replica in [&a, &b] {
        // Leadership is given up: nobody writes while the store is away.
        wait_until("the lead given up", Duration::from_secs(30), || async {
            (leader_gauge(replica.port).await == Some(0.0)).then_some(())
        })
        .await;
        assert_eq!(announce(replica.port, "3.7.2").await, 503);
        let first = runs(&metrics(replica.port).await.expect("metrics answer"));
        wait_until("checks keep running", Duration::from_secs(30), || async {
            let now = runs(&metrics(replica.port).await?);
            (now > first).then_some(())
        })
        .await;
    }
    pair.store.start_again().expect("store back");
    one_leader(&[&a, &b]).await;
    let kept = pair.store_count("SELECT count(*) FROM deploywatch.samples");
    assert!(kept >= 5, "samples recorded before are kept: {kept}");
    assert_eq!(
        pair.store_count("SELECT count(*) FROM deploywatch.deployments WHERE to_version = '3.7.1'"),
        1,
        "the deployment recorded before is kept"
    );
    assert_eq!(
        pair.store_count("SELECT count(*) FROM deploywatch.deployments WHERE to_version = '3.7.2'"),
        0,
        "the refused announcement was not recorded"
    );
    pair.wait_samples("sampling again", 30, |stored| stored > kept)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_starts_while_the_store_is_away_and_leads_once_it_is_back() {
    let mut pair = Pair::new(Version::V370, 600);
    pair.store.stop().expect("store down");
    let a = pair.spawn();
    wait_until(
        "checks run and the lead is not taken",
        Duration::from_secs(30),
        || async {
            let body = metrics(a.port).await?;
            let scrape = parse_metrics(&body);
            let ran = scrape
                .metric("deploywatch_check_runs_total")
                .label("target", "cognit")
                .samples()
                .len();
            let leader = scrape
                .metric("deploywatch_target_leader")
                .label("target", "cognit")
                .value_opt()?;
            (ran > 0 && leader == 0.0).then_some(())
        },
    )
    .await;
    pair.store.start_again().expect("store back");
    one_leader(&[&a]).await;
    pair.wait_samples("samples in the store", 30, |stored| stored > 0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_a_reload_removes_is_handed_to_the_other_replica_at_once() {
    let pair = Pair::new(Version::V370, 60);
    // Each replica reads a directory of its own, so one can be reloaded apart.
    let dirs = [Pair::config_dir(&pair.main), Pair::config_dir(&pair.main)];
    let replicas = [Replica::spawn(&dirs[0]), Replica::spawn(&dirs[1])];
    let leader = one_leader(&[&replicas[0], &replicas[1]]).await;
    let follower = 1 - leader;
    // The leader now watches the same database under another name: cognit is no longer its.
    let renamed = pair
        .main
        .replace("name = \"cognit\"", "name = \"cognit-renamed\"");
    assert_ne!(renamed, pair.main);
    dirs[leader].write("deploywatch.toml", &renamed);
    common::signal(replicas[leader].child.id().expect("pid"), "-HUP");
    // Without the release, the lock stays with the leader's store session while it runs.
    wait_until(
        "the other replica leads cognit while the reloaded one runs on",
        Duration::from_secs(15),
        || async { (leader_gauge(replicas[follower].port).await == Some(1.0)).then_some(()) },
    )
    .await;
    let port = replicas[leader].port;
    wait_until(
        "the reloaded replica leads only the target it tracks now",
        Duration::from_secs(15),
        || async {
            let body = metrics(port).await?;
            let parsed = parse_metrics(&body);
            let leader = |target| {
                parsed
                    .metric("deploywatch_target_leader")
                    .label("target", target)
                    .value_opt()
            };
            (leader("cognit-renamed") == Some(1.0) && leader("cognit").is_none()).then_some(())
        },
    )
    .await;
}
