//! The evaluation of the regression rules, simulated: many deployments, each looked at after
//! every sample the way the daemon does (rules, then latching), so the figures count what would
//! have been published and paged. Run with `cargo bench --bench evaluation`; prints Markdown for
//! BENCHMARKS.md. `DEPLOYWATCH_BENCH_REPS` sets the deployments per scenario (default 10);
//! with `DEPLOYWATCH_BENCH_VERBOSE` set, every flag that is not the injected regression is
//! printed to stderr with its message. `DEPLOYWATCH_BENCH_ONLY` keeps the scenarios whose name
//! contains it. `DEPLOYWATCH_BENCH_HOUR` sets the samples of `first_hour` (default 20; the
//! shipped one-minute `sample_interval` gives 60).
//!
//! The workload: 200 statements with heavy-tailed call rates (Zipf, exponent 1.1, about 150
//! calls a second in all, three statements per transaction), per-sample mean times with
//! autocorrelated noise (AR(1) on the log, phi 0.6) plus the noise of averaging few calls, and
//! a daily cycle of traffic (±30 %). 30 tables, four of them small lookup tables read by
//! sequential scans (so their scans follow traffic); a background error share of 0.2 % of the
//! application's transactions; deploywatch's own 22 read-only transactions a minute. The clock
//! is compressed: a sample a minute, 120 baseline samples, `first_hour` 20 samples,
//! `first_day` 40 more, `first_week` 40 more, and a "day" of 240 samples.

#[allow(dead_code)]
mod common;

use std::collections::BTreeMap;
use std::time::Instant;

use deploywatch::analysis::deployment::{latch, Finding};
use deploywatch::analysis::regression::{self, Thresholds};
use deploywatch::analysis::sample::{
    CheckPoint, DbCounters, IndexDelta, Sample, StatementDelta, TableCounters, SERVER_RESTART,
};
use deploywatch::analysis::window::{self, Verdict, Window};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::scenario::{stray_signals, Hit, Scenario, Subjects, ALL};

const STATEMENTS: usize = 200;
const TABLES: usize = 30;
const LOOKUP_TABLES: usize = 4;
const BASELINE: usize = 120;
/// `first_hour`'s samples when `DEPLOYWATCH_BENCH_HOUR` is not set.
const DEFAULT_HOUR: usize = 20;
const DAY: usize = 40;
const WEEK: usize = 40;
const DAY_CYCLE: f64 = 240.0;
const SECONDS: f64 = 60.0;

/// `first_hour`'s samples: `DEPLOYWATCH_BENCH_HOUR`, else [`DEFAULT_HOUR`].
fn hour() -> usize {
    static HOUR: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *HOUR.get_or_init(|| {
        std::env::var("DEPLOYWATCH_BENCH_HOUR")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(DEFAULT_HOUR)
    })
}
const CALLS_PER_SECOND: f64 = 150.0;
const OWN_TRANSACTIONS_PER_SAMPLE: f64 = 22.0;

/// The statement an injected regression hits: a busy one (the 3rd by calls) on a table with an
/// index, and an UPDATE for the lock contention (the 5th).
const HIT: usize = 2;
const LOCKED: usize = 4;

fn thresholds() -> Thresholds {
    // The shipped defaults (README, configuration reference).
    Thresholds::default()
}

/// The simulated workload names its statements `query N` and its tables `tN`.
struct Simulated;

impl Subjects for Simulated {
    fn is_statement(&self, finding: &Finding, hit: Hit) -> bool {
        let statement = match hit {
            Hit::Indexed | Hit::Slowed => HIT,
            Hit::Locked => LOCKED,
        };
        finding.subject == format!("query {statement}")
    }

    fn scanned_table(&self) -> String {
        table_name(table_of(HIT))
    }
}

fn table_of(statement: usize) -> usize {
    if statement < 8 {
        // The busiest statements: a few on lookup tables, the rest on large tables.
        if statement % 4 == 1 {
            statement % LOOKUP_TABLES
        } else {
            LOOKUP_TABLES + statement
        }
    } else {
        statement % TABLES
    }
}

fn table_name(table: usize) -> String {
    format!("public.t{table}")
}

fn normal(rng: &mut StdRng) -> f64 {
    let (u1, u2): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen());
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn poisson(rng: &mut StdRng, lambda: f64) -> f64 {
    if lambda <= 0.0 {
        return 0.0;
    }
    if lambda > 30.0 {
        return (lambda + lambda.sqrt() * normal(rng)).round().max(0.0);
    }
    let limit = (-lambda).exp();
    let (mut k, mut p) = (0.0, 1.0);
    loop {
        p *= rng.gen::<f64>();
        if p <= limit {
            return k;
        }
        k += 1.0;
    }
}

/// One simulated database: per-statement base times and rates, and the AR(1) noise states.
struct Workload {
    rng: StdRng,
    base_ms: Vec<f64>,
    rate: Vec<f64>,
    noise: Vec<f64>,
    size: f64,
    phase: f64,
}

impl Workload {
    fn new(seed: u64) -> Workload {
        let mut rng = StdRng::seed_from_u64(seed);
        let weights: Vec<f64> = (0..STATEMENTS)
            .map(|i| 1.0 / ((i + 1) as f64).powf(1.1))
            .collect();
        let total: f64 = weights.iter().sum();
        let rate = weights
            .iter()
            .map(|w| w / total * CALLS_PER_SECOND)
            .collect();
        let base_ms: Vec<f64> = (0..STATEMENTS)
            .map(|_| {
                (0.5f64.ln() + 1.2 * normal(&mut rng))
                    .exp()
                    .clamp(0.05, 200.0)
            })
            .collect();
        let mut base_ms: Vec<f64> = base_ms;
        // The statements the regressions hit: a 2 ms function, a 1 ms update.
        base_ms[HIT] = 2.0;
        base_ms[LOCKED] = 1.0;
        let phase = rng.gen::<f64>() * DAY_CYCLE;
        Workload {
            rng,
            base_ms,
            rate,
            noise: vec![0.0; STATEMENTS + 20],
            size: 5e9,
            phase,
        }
    }

    /// The sample ending at step `t` (0 = the deployment; negative = baseline), with what the
    /// scenario changes from the deployment on.
    fn sample(&mut self, t: i64, scenario: Scenario, failing_share: f64) -> Sample {
        let after = t >= 0;
        let cycle =
            1.0 + 0.3 * (2.0 * std::f64::consts::PI * (t as f64 + self.phase) / DAY_CYCLE).sin();
        let traffic = cycle
            * match scenario {
                Scenario::TrafficDouble if after => 2.0,
                Scenario::TrafficQuarter if after => 0.25,
                _ => 1.0,
            };
        let load = if traffic > 1.5 { 1.1 } else { 1.0 };
        let cold = match scenario {
            Scenario::Restart if t >= 1 => 1.0 + 2.0 * (-((t - 1) as f64) / 3.0).exp(),
            _ => 1.0,
        };
        let mut statements = BTreeMap::new();
        let mut tables: BTreeMap<String, TableCounters> = (0..TABLES)
            .map(|i| (table_name(i), TableCounters::default()))
            .collect();
        let mut indexes = BTreeMap::new();
        let extra = if after && scenario == Scenario::NewQueries {
            20
        } else {
            0
        };
        let mut all_calls = 0.0;
        for i in 0..(STATEMENTS + extra) {
            let rate = if i < STATEMENTS { self.rate[i] } else { 0.2 };
            let calls = poisson(&mut self.rng, rate * SECONDS * traffic);
            self.noise[i] = 0.6 * self.noise[i] + 0.12 * normal(&mut self.rng);
            if calls == 0.0 {
                continue;
            }
            all_calls += calls;
            let base = if i < STATEMENTS { self.base_ms[i] } else { 1.0 };
            let mut factor = self.noise[i].exp() * load * cold;
            let table = table_of(i.min(STATEMENTS - 1));
            match scenario {
                Scenario::IndexDrop if after && i == HIT => factor *= 8.0,
                Scenario::Slower(f) if after && i == HIT => factor *= f,
                // In about 30 % of the samples some calls wait for a row lock.
                Scenario::LockContention if after && i == LOCKED && self.rng.gen::<f64>() < 0.3 => {
                    factor *= 20.0
                }
                Scenario::Vacuum if (2..4).contains(&t) && table == 7 => factor *= 1.3,
                _ => {}
            }
            // The mean of `calls` calls with a per-call spread of about 50 %.
            let sampling = (0.5 * normal(&mut self.rng) / calls.sqrt()).exp();
            let total_ms = base * factor * sampling * calls;
            statements.insert(
                i.to_string(),
                StatementDelta {
                    calls,
                    total_ms,
                    rows: calls,
                    query: format!("SELECT ... FROM t{table} /* {i} */"),
                },
            );
            let entry = tables.entry(table_name(table)).or_default();
            let dropped = scenario == Scenario::IndexDrop && after && i == HIT;
            if table < LOOKUP_TABLES || dropped {
                entry.seq_scan += calls;
                entry.seq_tup_read += calls * if dropped { 50_000.0 } else { 31.0 };
            } else {
                entry.idx_scan += calls;
                let index = indexes
                    .entry(format!("public.t{table}_pkey"))
                    .or_insert(IndexDelta {
                        table: table_name(table),
                        scans: 0.0,
                    });
                index.scans += calls;
            }
        }
        if scenario == Scenario::Vacuum && t == 2 {
            let entry = tables.entry(table_name(7)).or_default();
            entry.seq_scan += 1.0;
            entry.seq_tup_read += 1e6;
        }
        let app = (all_calls / 3.0).round();
        let background = poisson(&mut self.rng, app * 0.002);
        let failing = if scenario == Scenario::FailingConstraint && after {
            (app * failing_share).round()
        } else {
            0.0
        };
        let database = DbCounters {
            xact_commit: (app - background - failing).max(0.0) + OWN_TRANSACTIONS_PER_SAMPLE,
            xact_rollback: background + failing,
            blks_hit: app * 100.0,
            blks_read: app,
            ..DbCounters::default()
        };
        self.size += 1e6 / 60.0 * traffic;
        let violation = match scenario {
            Scenario::Integrity(w) => {
                let start = match w {
                    Window::FirstHour => 3,
                    Window::FirstDay => (hour() + 5) as i64,
                    _ => (hour() + DAY + 5) as i64,
                };
                t >= start
            }
            _ => false,
        };
        let mut checks = BTreeMap::new();
        checks.insert(
            "orphaned_submissions".to_string(),
            CheckPoint {
                category: "integrity".into(),
                status: if violation { "fail" } else { "pass" }.into(),
                value: Some(if violation { 3.0 } else { 0.0 }),
            },
        );
        checks.insert(
            "schema_version".to_string(),
            CheckPoint {
                category: "health".into(),
                status: "pass".into(),
                value: None,
            },
        );
        let mut sample = Sample {
            at: 1e6 + t as f64 * SECONDS,
            seconds: SECONDS,
            database: Some(database),
            statements: Some(statements),
            indexes,
            tables,
            size_bytes: self.size,
            connections: 20.0 * traffic.max(0.5),
            max_connections: 100.0,
            checks,
            statements_available: true,
            ..Sample::default()
        };
        // A reset leaves its interval out, as `sample::delta` does.
        let reset = match scenario {
            Scenario::StatementsReset => t == 2,
            Scenario::Restart => t == 1,
            _ => false,
        };
        if reset {
            sample.statements = None;
            sample.resets.push("pg_stat_statements".into());
            if scenario == Scenario::Restart {
                sample.database = None;
                sample.resets.push("pg_stat_database".into());
                sample.resets.push(SERVER_RESTART.into());
            }
        }
        sample
    }
}

/// What one simulated deployment showed, the injected regression's looks counted in samples
/// since the deployment.
type Outcome = common::scenario::Outcome<usize>;

fn which_window(step: usize) -> Window {
    if step < hour() {
        Window::FirstHour
    } else if step < hour() + DAY {
        Window::FirstDay
    } else {
        Window::FirstWeek
    }
}

fn simulate(scenario: Scenario, seed: u64) -> Outcome {
    let mut workload = Workload::new(seed);
    let failing_share = 0.10 + 0.10 * (seed % 11) as f64 / 10.0;
    let baseline: Vec<Sample> = (-(BASELINE as i64)..0)
        .map(|t| workload.sample(t, scenario, failing_share))
        .collect();
    let t = thresholds();
    let mut outcome = Outcome::default();
    let mut since: Vec<Sample> = Vec::new();
    let mut flags: BTreeMap<Window, Vec<Finding>> = BTreeMap::new();
    let total = hour() + DAY + WEEK;
    for step in 0..total {
        since.push(workload.sample(step as i64, scenario, failing_share));
        let window = which_window(step);
        let closed = step + 1 == hour() || step + 1 == hour() + DAY || step + 1 == total;
        let start = match window {
            Window::FirstHour => 0,
            Window::FirstDay => hour(),
            _ => hour() + DAY,
        };
        let in_window = &since[start..];
        let judgement = regression::judge(window, &baseline, in_window, &since, closed, &t);
        let previous = flags.remove(&window).unwrap_or_default();
        let now = 1e6 + step as f64 * SECONDS;
        let latched = latch(&previous, judgement.regressions, now, closed);
        for f in latched.iter().filter(|f| f.active()) {
            outcome.published = true;
            if f.confirmed() {
                outcome.paged = true;
            }
            if scenario.is_the_regression(f, &Simulated) {
                outcome.first_published.get_or_insert(step + 1);
                outcome.window.get_or_insert(window);
                if f.confirmed() {
                    outcome.first_confirmed.get_or_insert(step + 1);
                }
            } else if !outcome.stray.contains(&f.signal) {
                if std::env::var_os("DEPLOYWATCH_BENCH_VERBOSE").is_some() {
                    eprintln!(
                        "{} seed {seed} sample {}: {} {}",
                        scenario.name(),
                        step + 1,
                        f.signal.as_str(),
                        f.message
                    );
                }
                outcome.stray.push(f.signal);
            }
        }
        if closed {
            let confirmed = latched.iter().filter(|f| f.was_confirmed()).count();
            let verdict = window::verdict(true, confirmed, in_window.len(), t.min_samples);
            outcome.final_regression |= verdict == Verdict::Regression;
        } else {
            flags.insert(window, latched);
        }
    }
    outcome
}

fn percent(n: usize, of: usize) -> String {
    if of == 0 {
        "-".into()
    } else {
        format!("{:.1} %", 100.0 * n as f64 / of as f64)
    }
}

fn median(values: &mut [usize]) -> String {
    if values.is_empty() {
        return "-".into();
    }
    values.sort_unstable();
    values[values.len() / 2].to_string()
}

fn main() {
    let reps: u64 = std::env::var("DEPLOYWATCH_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let started = Instant::now();
    let (harmless, injected): (Vec<Scenario>, Vec<Scenario>) = ALL
        .iter()
        .filter(|scenario| {
            std::env::var("DEPLOYWATCH_BENCH_ONLY")
                .map_or(true, |only| scenario.name().contains(only.as_str()))
        })
        .partition(|scenario| scenario.harmless());
    println!("## Evaluation, simulated: harmless changes and injected regressions\n");
    println!(
        "{reps} deployments per scenario (seeds 1..={reps}), each looked at after every sample \
         through `regression::judge` and `deployment::latch` with the shipped thresholds. \
         Compressed clock: a sample a minute, {BASELINE} baseline samples, `first_hour` {} \
         samples, `first_day` {DAY} more, `first_week` {WEEK} more. {STATEMENTS} statements with \
         Zipf call rates (about {CALLS_PER_SECOND} calls/s), AR(1) noise, a daily cycle.\n",
        hour()
    );
    println!("### Harmless changes\n");
    println!(
        "| scenario | deployments | flag published at some look | paged (confirmed) | final regression | signals that fired |\n| --- | --- | --- | --- | --- | --- |"
    );
    let (mut all, mut published, mut paged, mut finals) = (0, 0, 0, 0);
    for &scenario in &harmless {
        let outcomes: Vec<Outcome> = (1..=reps).map(|seed| simulate(scenario, seed)).collect();
        let count = |f: fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
        let (p, c, f) = (
            count(|o| o.published),
            count(|o| o.paged),
            count(|o| o.final_regression),
        );
        let n = reps as usize;
        all += n;
        published += p;
        paged += c;
        finals += f;
        println!(
            "| {} | {n} | {p} ({}) | {c} ({}) | {f} ({}) | {} |",
            scenario.name(),
            percent(p, n),
            percent(c, n),
            percent(f, n),
            stray_signals(&outcomes)
        );
    }
    println!(
        "| **all harmless** | {all} | {published} ({}) | {paged} ({}) | {finals} ({}) | |",
        percent(published, all),
        percent(paged, all),
        percent(finals, all)
    );
    println!("\n### Injected regressions\n");
    println!(
        "| regression | deployments | caught (published) | confirmed by the end of first_day (in first_week: of first_week) | median samples to publish | median samples to confirm | slowest to confirm | published / confirmed within 10 samples | flagged in the window where it starts | other signals that fired |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for &scenario in &injected {
        let (mut caught, mut by_day, mut right_window) = (0, 0, 0);
        let (mut to_publish, mut to_confirm) = (Vec::new(), Vec::new());
        let outcomes: Vec<Outcome> = (1..=reps).map(|seed| simulate(scenario, seed)).collect();
        for o in &outcomes {
            if let Some(s) = o.first_published {
                caught += 1;
                // Samples since the regression began (integrity: since it was injected).
                let offset = match scenario {
                    Scenario::Integrity(Window::FirstHour) => 3,
                    Scenario::Integrity(Window::FirstDay) => hour() + 5,
                    Scenario::Integrity(_) => hour() + DAY + 5,
                    _ => 0,
                };
                to_publish.push(s.saturating_sub(offset));
                if let Some(c) = o.first_confirmed {
                    to_confirm.push(c.saturating_sub(offset));
                    let deadline = match scenario {
                        Scenario::Integrity(Window::FirstWeek) => hour() + DAY + WEEK,
                        _ => hour() + DAY,
                    };
                    if c <= deadline {
                        by_day += 1;
                    }
                }
            }
            if o.window == Some(scenario.starts_in()) {
                right_window += 1;
            }
        }
        let n = reps as usize;
        let slowest = to_confirm
            .iter()
            .max()
            .map_or("-".to_string(), |v| v.to_string());
        let within_ten = |samples: &[usize]| samples.iter().filter(|&&s| s <= 10).count();
        let (published_in_ten, confirmed_in_ten) =
            (within_ten(&to_publish), within_ten(&to_confirm));
        println!(
            "| {} | {n} | {caught} ({}) | {by_day} ({}) | {} | {} | {slowest} | {published_in_ten} / {confirmed_in_ten} of {n} | {right_window} of {n} | {} |",
            scenario.name(),
            percent(caught, n),
            percent(by_day, n),
            median(&mut to_publish),
            median(&mut to_confirm),
            stray_signals(&outcomes)
        );
    }
    println!(
        "\n{} simulated deployments in {:.1} s.\n",
        reps as usize * (harmless.len() + injected.len()),
        started.elapsed().as_secs_f64()
    );
}
