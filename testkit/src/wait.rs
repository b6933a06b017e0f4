//! Waiting on a condition with a deadline, for the integration tests and the benchmarks.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often [`wait_until`] asks again.
const POLL: Duration = Duration::from_millis(100);

/// Polls `probe` until it returns `Some`, and returns that; panics naming `what` once
/// `deadline` has passed without it.
pub async fn wait_until<T, F, Fut>(what: &str, deadline: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}
