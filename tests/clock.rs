//! Time has one owner: a daemon started with an injected clock reads "now" from it everywhere,
//! so a test can set the time instead of waiting for it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{get, wait_until, ConfigDir};
use deploywatch::time::{parse_rfc3339, Clock, ManualClock};

#[tokio::test]
async fn the_daemon_reads_now_from_the_injected_clock() {
    let dir = ConfigDir::new();
    // An unreachable target: nothing here needs a database, only the daemon's own clock.
    dir.write(
        "deploywatch.toml",
        "[deployments]\nenabled = false\n\n[[targets]]\nname = \"db\"\nhost = \"127.0.0.1\"\nport = 1\ndbname = \"x\"\n",
    );
    dir.write(
        "checks/pack.toml",
        "[pack]\nname = \"p\"\n\n[[check]]\nname = \"one\"\ncategory = \"health\"\nseverity = \"critical\"\ninterval = \"1s\"\nsql = \"SELECT 1\"\nexpect = \"== 1\"\n",
    );
    let start = parse_rfc3339("2031-05-01T12:00:00Z").expect("time");
    let clock = Arc::new(ManualClock::new(start));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let handle = deploywatch::daemon::start_with_clock(dir.load(), listener, clock.clone())
        .expect("daemon starts");
    let url = format!("http://{address}/status?format=json");

    let status = |url: String| async move {
        let (code, body) = get(&url).await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).expect("json")
    };
    let first = status(url.clone()).await;
    assert_eq!(first["generated_at"], "2031-05-01T12:00:00Z", "{first}");

    // The check's failed run is stamped with the clock's time, not the machine's.
    let run = wait_until("a run recorded", Duration::from_secs(30), || {
        let url = url.clone();
        async move {
            let value = status(url).await;
            value["targets"][0]["checks"][0]["last_run"]
                .as_str()
                .map(str::to_string)
        }
    })
    .await;
    assert_eq!(run, "2031-05-01T12:00:00Z");

    clock.advance(Duration::from_secs(3600));
    let later = status(url).await;
    assert_eq!(later["generated_at"], "2031-05-01T13:00:00Z", "{later}");
    assert_eq!(clock.now(), start + 3600.0);
    handle.shutdown().await.expect("clean shutdown");
}
