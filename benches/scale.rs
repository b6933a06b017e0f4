//! Deployment analysis at production scale, synthetic, through the real store and judging code
//! on a simulated clock. Run with `cargo bench --bench scale`; prints Markdown for
//! BENCHMARKS.md.
//!
//! 5,000 statements with heavy-tailed (Zipf) call rates and log-normal per-call times, 20
//! tables, 40 indexes and 30 checks; one sample a minute. Seven days of baseline are written to
//! a SQLite store on disk, then a deployment: the baseline is summarised as the tracker does
//! (statement totals, then the summary), and a whole `first_week` of 10,080 samples follows,
//! each stored, added to the running summaries and judged, as the tracker does every pass.
//! One statement of the top 20 gets 2x slower at the deployment: it must be flagged.
//! Figures: resident memory (peak and at each day), judging pass time, store bytes per day.
//!
//! `DEPLOYWATCH_SCALE_DAYS` (default 7) shortens the baseline and the window for a quick look.

#[allow(dead_code)]
mod common;

use std::collections::BTreeMap;
use std::time::Instant;

use deploywatch::analysis::deployment::{DeploymentKind, DeploymentRecord, Detection, Signal};
use deploywatch::analysis::judging::{self, Summaries};
use deploywatch::analysis::sample::{
    CheckPoint, DbCounters, IndexDelta, Sample, StatementDelta, TableCounters,
};
use deploywatch::analysis::summary::Summary;
use deploywatch::analysis::window::{self, WindowDurations};
use deploywatch::storage::Store;
use deploywatch_testkit::process;

use common::random::Lcg;

const STATEMENTS: usize = 5000;
const MINUTE: f64 = 60.0;
const SLOWED: usize = 7;

/// Resident and peak resident memory, KiB.
fn memory() -> (u64, u64) {
    let me = std::process::id();
    (process::rss_kib(me), process::status_kib(me, "VmHWM:"))
}

struct World {
    rng: Lcg,
    rates: Vec<f64>,
    means: Vec<f64>,
    ids: Vec<String>,
    texts: Vec<String>,
}

impl World {
    fn new() -> World {
        let mut rng = Lcg(20_261_126);
        let rates = (0..STATEMENTS)
            .map(|i| 6000.0 / ((i + 1) as f64).powf(1.2))
            .collect();
        let means = (0..STATEMENTS)
            .map(|_| 0.05 * 1000f64.powf(rng.uniform()))
            .collect();
        let ids = (0..STATEMENTS)
            .map(|i| ((i as i64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15u64 as i64)).to_string())
            .collect();
        let texts = (0..STATEMENTS)
            .map(|i| {
                format!(
                    "SELECT id, state, created_at FROM table_{} WHERE tenant_id = $1 AND key_{i} = $2 ORDER BY created_at DESC LIMIT $3",
                    i % 20
                )
            })
            .collect();
        World {
            rng,
            rates,
            means,
            ids,
            texts,
        }
    }

    fn sample(&mut self, at: f64, deployed: bool) -> Sample {
        let mut statements = BTreeMap::new();
        let mut commits = 0.0;
        for i in 0..STATEMENTS {
            let calls = self.rng.poisson(self.rates[i]);
            if calls == 0.0 {
                continue;
            }
            commits += calls;
            let slow = if deployed && i == SLOWED { 2.0 } else { 1.0 };
            let mean = self.means[i] * slow * (0.25 * self.rng.normal()).exp();
            statements.insert(
                self.ids[i].clone(),
                StatementDelta {
                    calls,
                    total_ms: calls * mean,
                    rows: calls,
                    query: self.texts[i].clone(),
                },
            );
        }
        let mut sample = Sample {
            at,
            seconds: MINUTE,
            database: Some(DbCounters {
                xact_commit: commits,
                xact_rollback: (commits * 0.002).round(),
                blks_hit: commits * 12.0,
                blks_read: commits * 0.1,
                ..DbCounters::default()
            }),
            statements: Some(statements),
            size_bytes: 50e9 + at * 10.0,
            connections: 40.0,
            max_connections: 200.0,
            statements_available: true,
            ..Sample::default()
        };
        for t in 0..20 {
            let seq = self.rng.poisson(2.0);
            sample.tables.insert(
                format!("public.table_{t}"),
                TableCounters {
                    seq_scan: seq,
                    seq_tup_read: seq * 1000.0,
                    idx_scan: self.rng.poisson(500.0),
                },
            );
        }
        for x in 0..40 {
            sample.indexes.insert(
                format!("public.table_{}_idx_{x}", x % 20),
                IndexDelta {
                    table: format!("public.table_{}", x % 20),
                    scans: self.rng.poisson(250.0),
                },
            );
        }
        for c in 0..30 {
            sample.checks.insert(
                format!("check_{c}"),
                CheckPoint {
                    category: if c % 3 == 0 { "integrity" } else { "health" }.to_string(),
                    status: "pass".to_string(),
                    value: Some(0.0),
                },
            );
        }
        sample
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn main() {
    let days: f64 = std::env::var("DEPLOYWATCH_SCALE_DAYS")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(7.0);
    let per_day = (24.0 * 60.0) as usize;
    let samples = (days * per_day as f64) as usize;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.sqlite");
    let store = Store::open(&path).expect("store");
    let mut world = World::new();
    let start = 1_800_000_000.0;
    let (rss_start, _) = memory();

    let began = Instant::now();
    for m in 0..samples {
        let sample = world.sample(start + MINUTE * (m + 1) as f64, false);
        store.add_sample("app", &sample).expect("sample");
    }
    let baseline_write = began.elapsed();
    let baseline_bytes = store.size_bytes().expect("size");
    let deployed_at = start + MINUTE * (samples as f64 + 0.5);
    let record = DeploymentRecord {
        id: 1,
        target: "app".into(),
        from_version: Some("1".into()),
        to_version: "2".into(),
        kind: DeploymentKind::Deploy,
        detection: Detection::Announced,
        at: deployed_at,
        finished_at: None,
        note: None,
    };
    let durations = WindowDurations {
        first_hour: std::time::Duration::from_secs(3600),
        first_day: std::time::Duration::from_secs(86_400),
        first_week: std::time::Duration::from_secs((days * 86_400.0) as u64),
    };
    let settings = judging::Settings {
        durations,
        ..judging::Settings::default()
    };

    // The baseline, summarised once, as the tracker does.
    let began = Instant::now();
    let (from, to) = window::baseline_range(
        deployed_at,
        std::time::Duration::from_secs((days * 86_400.0) as u64),
        None,
    );
    let mut totals = BTreeMap::new();
    store
        .each_sample("app", from, to, |s| judging::add_totals(&mut totals, &s))
        .expect("totals");
    let mut baseline = Summary::new(5, judging::baseline_following(&totals));
    store
        .each_sample("app", from, to, |s| baseline.add(&s))
        .expect("baseline");
    let mut summaries = Summaries::new(&record, baseline, &totals, 5);
    drop(totals);
    let summarise = began.elapsed();
    let (rss_after_baseline, _) = memory();

    // The first week: store, summarise, judge, every minute.
    let mut judging_ms = Vec::with_capacity(samples);
    let mut verdicts = Vec::new();
    let mut rss_by_day = Vec::new();
    let mut flagged_at: Option<usize> = None;
    let began = Instant::now();
    for m in 0..samples {
        let at = deployed_at + MINUTE * (m as f64 + 0.5);
        let sample = world.sample(at, true);
        summaries.add(&sample, &durations);
        store.add_sample("app", &sample).expect("sample");
        drop(sample);
        let judge_start = Instant::now();
        let (view, closed) = judging::judge(
            &record,
            &summaries,
            &verdicts,
            at + 1.0,
            &settings,
            Vec::new(),
            0,
        );
        judging_ms.push(judge_start.elapsed().as_secs_f64() * 1000.0);
        verdicts.extend(closed);
        if flagged_at.is_none()
            && view.windows.iter().any(|w| {
                w.regressions.iter().any(|f| {
                    f.signal == Signal::QueryLatency
                        && f.evidence.get("query_id").and_then(|v| v.as_str())
                            == Some(world.ids[SLOWED].as_str())
                })
            })
        {
            flagged_at = Some(m + 1);
        }
        if (m + 1) % 10 == 0 {
            store.prune(deployed_at - 14.0 * 86_400.0).expect("prune");
        }
        if (m + 1) % per_day == 0 {
            rss_by_day.push(memory().0);
        }
    }
    let window_time = began.elapsed();
    let (_, peak) = memory();
    let end_bytes = store.size_bytes().expect("size");
    judging_ms.sort_by(f64::total_cmp);

    let mib = |kib: u64| kib as f64 / 1024.0;
    let window_days = samples as f64 / per_day as f64;
    println!("## Scale: 5,000 statements, a week of baseline and a whole first week (synthetic)");
    println!();
    println!(
        "Through the real store (SQLite file) and judging code on a simulated clock: {STATEMENTS} statements with Zipf call rates (6000/(rank)^1.2 calls a minute, so about {} move in a minute) and log-normal times per call, 20 tables, 40 indexes, 30 checks; one sample a minute; {samples} baseline samples, then a deployment and {samples} window samples, each stored, summarised and judged. Statement #{} of the top 20 is 2x slower after the deployment.",
        expected_moving(),
        SLOWED + 1
    );
    println!();
    println!("| figure | value |");
    println!("| --- | --- |");
    println!("| resident memory at start | {:.1} MiB |", mib(rss_start));
    println!(
        "| resident memory after the baseline summary | {:.1} MiB |",
        mib(rss_after_baseline)
    );
    for (day, rss) in rss_by_day.iter().enumerate() {
        println!(
            "| resident memory, window day {} | {:.1} MiB |",
            day + 1,
            mib(*rss)
        );
    }
    println!("| peak resident memory (VmHWM) | {:.1} MiB |", mib(peak));
    println!(
        "| judging pass p50 / p99 / max | {:.2} / {:.2} / {:.2} ms |",
        percentile(&judging_ms, 0.5),
        percentile(&judging_ms, 0.99),
        percentile(&judging_ms, 1.0)
    );
    println!(
        "| baseline summary (two reads of {samples} samples) | {:.1} s |",
        summarise.as_secs_f64()
    );
    println!(
        "| store after the baseline | {:.1} MiB ({:.1} MiB per day) |",
        baseline_bytes as f64 / 1048576.0,
        baseline_bytes as f64 / 1048576.0 / days
    );
    println!(
        "| store growth during the window | {:.1} MiB per day |",
        (end_bytes.saturating_sub(baseline_bytes)) as f64 / 1048576.0 / window_days
    );
    println!(
        "| writing the baseline / the window (incl. judging) | {:.1} s / {:.1} s |",
        baseline_write.as_secs_f64(),
        window_time.as_secs_f64()
    );
    println!(
        "| the 2x slower statement flagged | {} |",
        flagged_at.map_or("never".to_string(), |m| format!("after {m} window samples"))
    );
    println!(
        "| statements followed in detail (baseline / first window) | {} / {} |",
        summaries.baseline.statements.len(),
        summaries
            .windows
            .values()
            .next()
            .map_or(0, |w| w.statements.len())
    );
    println!(
        "| verdicts | {} |",
        verdicts
            .iter()
            .map(|v| format!("{} {}", v.window.as_str(), v.verdict.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// Statements expected to run at least once in a minute at the model's rates.
fn expected_moving() -> usize {
    (0..STATEMENTS)
        .map(|i| 1.0 - (-(6000.0 / ((i + 1) as f64).powf(1.2))).exp())
        .sum::<f64>()
        .round() as usize
}
