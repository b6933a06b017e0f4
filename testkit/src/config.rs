//! Configuration files for a daemon under test.

/// The main configuration file of a daemon that judges deployments on a compressed clock:
/// the API token read from the file `token`; every check every second (5 s timeout); the
/// `store` section's keys, if any; statistics sampled every `sample_seconds`; a baseline of at
/// least 4 samples and windows of `hour`, `2 * hour` and `3 * hour` seconds of at least 3
/// samples each; one target named `db`, the database `db` of the PostgreSQL on 127.0.0.1:`port`
/// as the role `deploywatch`.
pub fn compressed_clock(
    db: &str,
    port: u16,
    store: Option<&str>,
    sample_seconds: u64,
    hour: u64,
) -> String {
    let store = store
        .map(|keys| format!("[store]\n{keys}\n\n"))
        .unwrap_or_default();
    format!(
        "[server]\napi_token_file = \"token\"\n\n\
         [defaults]\ninterval = \"1s\"\ntimeout = \"5s\"\n\n[checks]\ninterval_override = \"1s\"\n\n\
         {store}\
         [deployments]\nsample_interval = \"{sample_seconds}s\"\nbaseline_span = \"1h\"\nmin_baseline_samples = 4\nmin_window_samples = 3\n\
         latency_min_calls = 5\nfirst_hour = \"{hour}s\"\nfirst_day = \"{}s\"\nfirst_week = \"{}s\"\n\n\
         [[targets]]\nname = \"{db}\"\nhost = \"127.0.0.1\"\nport = {port}\ndbname = \"{db}\"\nuser = \"deploywatch\"\n",
        hour * 2,
        hour * 3,
    )
}

#[cfg(test)]
mod tests {
    use super::compressed_clock;

    #[test]
    fn the_store_section_is_there_only_when_asked_for() {
        let with = compressed_clock("cognit", 5432, Some("path = \"state.sqlite\""), 1, 6);
        assert!(
            with.contains("[store]\npath = \"state.sqlite\"\n\n[deployments]"),
            "{with}"
        );
        assert!(with.contains("first_hour = \"6s\"\nfirst_day = \"12s\"\nfirst_week = \"18s\""));
        assert!(with.contains("port = 5432\ndbname = \"cognit\""));
        let without = compressed_clock("cognit", 5432, None, 2, 6);
        assert!(!without.contains("[store]"), "{without}");
        assert!(without.contains("sample_interval = \"2s\""), "{without}");
    }
}
