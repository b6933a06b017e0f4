//! A fleet split over replicas (`server.shard`, `run --shard N/M`): every discovered database is
//! watched by exactly one replica, the assignment survives a reload (the command line's shard
//! included), and an announcement sent to a replica that does not own its target reaches the
//! owner, or is refused with the owner's shard when the replicas are not listed.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{get, parse_metrics, wait_until, ConfigDir};
use deploywatch::commands::client;
use deploywatch::daemon::{self, Event};
use deploywatch::shard::shard_of;

const ONE_CHECK: &str = "[pack]\nname = \"one\"\n\n[[check]]\nname = \"one\"\ncategory = \"health\"\nseverity = \"info\"\nsql = \"SELECT 1\"\nexpect = \"== 1\"\n";

/// The targets a replica's `/status` lists, with whether each is reachable and has run its check.
async fn watched(url: &str) -> Vec<(String, bool)> {
    let (code, body) = get(&format!("{url}/status?format=json")).await;
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
    status["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .map(|t| {
            let name = t["name"].as_str().expect("name").to_string();
            let ran = t["reachable"] == true
                && t["checks"]
                    .as_array()
                    .is_some_and(|c| c.iter().all(|c| c["runs"].as_u64().unwrap_or(0) > 0));
            (name, ran)
        })
        .collect()
}

fn names(watched: &[(String, bool)]) -> BTreeSet<String> {
    watched.iter().map(|(n, _)| n.clone()).collect()
}

/// Waits until the replica at `url` watches exactly `want`, every one checked.
async fn wait_watching(url: &str, want: &BTreeSet<String>, what: &str) {
    wait_until(what, Duration::from_secs(90), || async {
        let now = watched(url).await;
        (names(&now) == *want && now.iter().all(|(_, ran)| *ran)).then_some(())
    })
    .await;
}

async fn metric(url: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let (_, body) = get(&format!("{url}/metrics")).await;
    let scrape = parse_metrics(&body);
    let mut query = scrape.metric(name);
    for (key, value) in labels {
        query = query.label(key, value);
    }
    query.value_opt()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_split_twenty_discovered_databases_keep_it_across_a_reload_and_forward_announcements(
) {
    let pg = common::cluster();
    let databases: Vec<String> = (0..20).map(|i| format!("tenant_{i:02}")).collect();
    common::create_databases(&pg, &databases, None);
    let all: BTreeSet<String> = databases.iter().map(|d| format!("tenants/{d}")).collect();
    let expected = |shard: u32| -> BTreeSet<String> {
        all.iter()
            .filter(|name| shard_of(name, 2) == shard)
            .cloned()
            .collect()
    };

    // Both replicas read one configuration file, as the pods of a StatefulSet do; it says
    // shard 0/2, and the second replica's command line says 1/2, which wins.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let first_url = format!("http://{}", listener.local_addr().expect("address"));
    let second_port = common::free_port();
    let second_url = format!("http://127.0.0.1:{second_port}");
    let dir = ConfigDir::new();
    dir.write("token", "shard-token");
    dir.write("checks/one.toml", ONE_CHECK);
    dir.write(
        "deploywatch.toml",
        &format!(
            "[server]\napi_token_file = \"token\"\nshard = \"0/2\"\nshard_peers = [\"{first_url}\", \"{second_url}\"]\n\n\
             [defaults]\ninterval = \"1s\"\ntimeout = \"2s\"\nconnect_timeout = \"1s\"\ndiscovery_interval = \"1s\"\n\n\
             [deployments]\nsample_interval = \"1s\"\n\n\
             [[targets]]\nname = \"tenants\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"deploywatch\"\ndatabases = [\"tenant_*\"]\n",
            pg.port()
        ),
    );
    let first = daemon::start(dir.load(), listener).expect("first replica starts");
    let mut second = dir
        .async_command()
        .args([
            "run",
            "--listen",
            &format!("127.0.0.1:{second_port}"),
            "--shard",
            "1/2",
        ])
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("second replica starts");

    let (mine, theirs) = (expected(0), expected(1));
    assert!(
        !mine.is_empty() && !theirs.is_empty(),
        "both shards own databases"
    );
    wait_watching(&first_url, &mine, "shard 0/2 watches its databases").await;
    wait_watching(&second_url, &theirs, "shard 1/2 watches its databases").await;
    let (seen_first, seen_second) = (
        names(&watched(&first_url).await),
        names(&watched(&second_url).await),
    );
    assert!(seen_first.is_disjoint(&seen_second), "no database twice");
    let union: BTreeSet<String> = seen_first.union(&seen_second).cloned().collect();
    assert_eq!(union, all, "every database is watched");

    // Each says which shard it is and what it owns.
    for (url, shard, owned) in [(&first_url, "0", &mine), (&second_url, "1", &theirs)] {
        assert_eq!(
            metric(
                url,
                "deploywatch_shard_info",
                &[("shard", shard), ("shards", "2")]
            )
            .await,
            Some(1.0),
            "{url}"
        );
        assert_eq!(metric(url, "deploywatch_shards", &[]).await, Some(2.0));
        assert_eq!(
            metric(url, "deploywatch_shard_targets", &[]).await,
            Some(owned.len() as f64)
        );
        let (_, json) = get(&format!("{url}/status")).await;
        let status: serde_json::Value = serde_json::from_str(&json).expect("JSON");
        assert_eq!(
            status["shard"]["index"],
            shard.parse::<u32>().expect("index")
        );
        assert_eq!(status["shard"]["count"], 2);
        assert_eq!(status["shard"]["targets"], owned.len());
        let (_, text) = get(&format!("{url}/status?format=text")).await;
        assert!(
            text.contains(&format!(
                "shard {shard}/2: this replica watches {} targets",
                owned.len()
            )),
            "{text}"
        );
    }

    // A reload of each (the file still says 0/2, and a second check is added, which shows
    // that the reload happened) keeps every database where it was.
    dir.write(
        "checks/one.toml",
        &format!("{ONE_CHECK}\n[[check]]\nname = \"two\"\ncategory = \"health\"\nseverity = \"info\"\nsql = \"SELECT 2\"\nexpect = \"== 2\"\n"),
    );
    first.events.send(Event::Reload).await.expect("reload");
    common::signal(second.id().expect("pid"), "-HUP");
    for url in [&first_url, &second_url] {
        wait_until("the reload is done", Duration::from_secs(30), || async {
            let (_, body) = get(&format!("{url}/status?check=two")).await;
            let status: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            let targets = status["targets"].as_array().expect("targets");
            (!targets.is_empty()
                && targets
                    .iter()
                    .all(|t| t["checks"].as_array().is_some_and(|c| c.len() == 1)))
            .then_some(())
        })
        .await;
    }
    wait_watching(&first_url, &mine, "shard 0/2 after the reload").await;
    wait_watching(
        &second_url,
        &theirs,
        "shard 1/2 after the reload (--shard wins)",
    )
    .await;

    // An announcement for a database of shard 1, sent to shard 0, is recorded by shard 1.
    let target = theirs.iter().next().expect("a database of shard 1").clone();
    let announcement = client::Announcement {
        target: Some(&target),
        version: "2.0.0",
        note: Some("sent to the other replica"),
        started_at: None,
    };
    let (code, answer) = client::announce(&first_url, "shard-token", &announcement)
        .await
        .expect("announce");
    assert_eq!(code.as_u16(), 201, "{answer}");
    let listed = |url: String, target: String| async move {
        let (_, body) = get(&format!("{url}/api/deployments?target={target}")).await;
        let list: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        list.as_array()
            .expect("list")
            .iter()
            .any(|d| d["target"] == target.as_str() && d["to_version"] == "2.0.0")
    };
    wait_until("the owner lists it", Duration::from_secs(10), || {
        let listing = listed(second_url.clone(), target.clone());
        async move { listing.await.then_some(()) }
    })
    .await;
    assert!(
        !listed(first_url.clone(), target.clone()).await,
        "the replica it was sent to does not"
    );
    // One of its own is recorded where it was sent.
    let own = mine.iter().next().expect("a database of shard 0").clone();
    let announcement = client::Announcement {
        target: Some(&own),
        ..announcement
    };
    let (code, answer) = client::announce(&first_url, "shard-token", &announcement)
        .await
        .expect("announce");
    assert_eq!(code.as_u16(), 201, "{answer}");
    wait_until("shard 0 lists its own", Duration::from_secs(10), || {
        let listing = listed(first_url.clone(), own.clone());
        async move { listing.await.then_some(()) }
    })
    .await;
    assert!(!listed(second_url.clone(), own.clone()).await);

    // With the owner gone, the replica says it cannot reach it, and records nothing.
    second.kill().await.expect("kill the second replica");
    let announcement = client::Announcement {
        target: Some(&target),
        version: "3.0.0",
        ..announcement
    };
    let (code, answer) = client::announce(&first_url, "shard-token", &announcement)
        .await
        .expect("announce");
    assert_eq!(code.as_u16(), 502, "{answer}");
    assert!(
        answer.contains(&format!(
            "belongs to shard 1/2, whose replica at {second_url} cannot be reached"
        )),
        "{answer}"
    );
    assert!(!listed(first_url.clone(), target.clone()).await);
    first.shutdown().await.expect("shutdown");
}

/// Without `shard_peers` a replica cannot forward: it refuses an announcement for another
/// shard's target with 421 and the owner's shard, and records nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_peers_an_announcement_for_another_shard_is_refused_with_its_owner() {
    // Two plain targets on a closed port, one of each shard (found with the same hash).
    let (mine, theirs) = (common::name_in_shard(0, 2), common::name_in_shard(1, 2));
    let port = common::free_port();
    let dir = ConfigDir::new();
    dir.write("token", "shard-token");
    dir.write("checks/one.toml", ONE_CHECK);
    let server = "api_token_file = \"token\"\nshard = \"0/2\"\n";
    let replica = |server: &str| common::replica_config(server, port, &[&mine, &theirs]);
    dir.write("deploywatch.toml", &replica(server));
    let config = dir.load();
    let handle = common::start(&dir).await;
    let url = common::base(&handle);
    let shown = names(&watched(&url).await);
    assert_eq!(shown, BTreeSet::from([mine.clone()]), "only its own target");
    // Asked about a target of the other shard, it says whose it is.
    let (code, body) = get(&format!("{url}/status?target={theirs}&format=text")).await;
    assert_eq!(code, 404, "{body}");
    assert!(
        body.contains(&format!(
            "{theirs:?} belongs to shard 1/2, not to this replica"
        )),
        "{body}"
    );
    let (_, table) = deploywatch::commands::status(
        Some(&url),
        None,
        None,
        deploywatch::commands::cli::OutputFormat::Table,
        &client::Trust::default(),
        None,
    )
    .await;
    assert!(
        table.contains("shard 0/2: this replica watches 1 target of the fleet\n"),
        "{table}"
    );

    let announcement = client::Announcement {
        target: Some(&theirs),
        version: "2.0.0",
        note: None,
        started_at: None,
    };
    let (code, body) = client::announce(&url, "shard-token", &announcement)
        .await
        .expect("announce");
    assert_eq!(code.as_u16(), 421, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(answer["shard"], 1);
    assert_eq!(answer["shards"], 2);
    let message = answer["error"].as_str().expect("error");
    assert!(
        message.contains(&format!("{theirs:?} belongs to shard 1/2"))
            && message.contains("server.shard_peers"),
        "{message}"
    );
    // `deploy mark` says the same and fails.
    std::env::set_var("SHARD_TEST_TOKEN", "shard-token");
    let (exit, output) = deploywatch::commands::deploy_mark(
        Some(&config),
        Some(&url),
        Some("SHARD_TEST_TOKEN"),
        Some(&theirs),
        "2.0.0",
        None,
        None,
        &client::Trust::default(),
    )
    .await;
    assert_eq!(exit, 1, "{output}");
    assert!(
        output.contains("421") && output.contains("shard 1/2"),
        "{output}"
    );
    // Without a target the replica cannot tell whose it is.
    let (code, body) = client::announce(
        &url,
        "shard-token",
        &client::Announcement {
            target: None,
            version: "2.0.0",
            note: None,
            started_at: None,
        },
    )
    .await
    .expect("announce");
    assert_eq!(code.as_u16(), 400, "{body}");
    assert!(body.contains("\\\"target\\\" is required"), "{body}");
    let (_, list) = get(&format!("{url}/api/deployments")).await;
    assert_eq!(list.trim(), "[]", "nothing was recorded");
    handle.shutdown().await.expect("shutdown");

    // Peers listed in the wrong order: shard 1's URL is this replica's own. The announcement
    // is forwarded once, the replica it reaches does not own the target either and refuses
    // a forwarded announcement instead of passing it on.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let own_url = format!("http://{}", listener.local_addr().expect("address"));
    let peers = format!(
        "shard_peers = [\"http://127.0.0.1:{}\", \"{own_url}\"]\n",
        common::free_port()
    );
    dir.write("deploywatch.toml", &replica(&format!("{server}{peers}")));
    let confused = daemon::start(dir.load(), listener).expect("starts");
    let (code, body) = client::announce(&own_url, "shard-token", &announcement)
        .await
        .expect("announce");
    assert_eq!(code.as_u16(), 421, "{body}");
    assert!(
        body.contains("it was forwarded here by shard 0/2, so the replicas disagree"),
        "{body}"
    );
    let (_, list) = get(&format!("{own_url}/api/deployments")).await;
    assert_eq!(list.trim(), "[]", "nothing was recorded");
    confused.shutdown().await.expect("shutdown");

    // A replica whose shard owns none of the targets watches nothing and is ready: it has no
    // target left to try.
    dir.write(
        "deploywatch.toml",
        &common::replica_config(server, port, &[&theirs]),
    );
    let idle = common::start(&dir).await;
    let url = common::base(&idle);
    let ready = format!("{url}/readyz");
    common::wait_until_ok(&ready, "the idle replica is ready", Duration::from_secs(10)).await;
    assert!(watched(&url).await.is_empty());
    assert_eq!(
        metric(&url, "deploywatch_shard_targets", &[]).await,
        Some(0.0)
    );
    idle.shutdown().await.expect("shutdown");
}
