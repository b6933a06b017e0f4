//! The deployments the evaluation benchmarks make, simulated or on a real PostgreSQL: harmless
//! changes the rules must not call a regression, and injected regressions they must find.

use std::collections::BTreeMap;

use deploywatch::analysis::deployment::{Finding, Signal};
use deploywatch::analysis::window::Window;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scenario {
    NoChange,
    TrafficDouble,
    TrafficQuarter,
    StatementsReset,
    Restart,
    NewQueries,
    Vacuum,
    IndexDrop,
    Slower(f64),
    FailingConstraint,
    LockContention,
    Integrity(Window),
}

/// Every scenario, the harmless ones first.
pub const ALL: [Scenario; 15] = [
    Scenario::NoChange,
    Scenario::TrafficDouble,
    Scenario::TrafficQuarter,
    Scenario::StatementsReset,
    Scenario::Restart,
    Scenario::NewQueries,
    Scenario::Vacuum,
    Scenario::IndexDrop,
    Scenario::Slower(1.5),
    Scenario::Slower(2.0),
    Scenario::FailingConstraint,
    Scenario::LockContention,
    Scenario::Integrity(Window::FirstHour),
    Scenario::Integrity(Window::FirstDay),
    Scenario::Integrity(Window::FirstWeek),
];

/// What one deployment of a scenario showed.
#[derive(Default)]
pub struct Outcome<T> {
    /// Any flag (suspected or confirmed) published at any look.
    pub published: bool,
    /// Any flag confirmed (paged) at any look.
    pub paged: bool,
    /// Any window closed `regression`.
    pub final_regression: bool,
    /// Signals of flags that were not the injected regression.
    pub stray: Vec<Signal>,
    /// The injected regression: when it was first published, and confirmed (`T` measures
    /// from the deployment), and the window it was first published in.
    pub first_published: Option<T>,
    pub first_confirmed: Option<T>,
    pub window: Option<Window>,
}

/// The signals that fired in `outcomes` but were not the injected regression, with how often:
/// `seq_scans x2, top_queries x1`, or `-`.
pub fn stray_signals<T>(outcomes: &[Outcome<T>]) -> String {
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    for signal in outcomes.iter().flat_map(|o| &o.stray) {
        *counts.entry(signal.as_str()).or_default() += 1;
    }
    if counts.is_empty() {
        return "-".to_string();
    }
    let listed: Vec<String> = counts.iter().map(|(s, n)| format!("{s} x{n}")).collect();
    listed.join(", ")
}

/// The statements of a workload that an injected regression hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hit {
    /// The query whose index is dropped.
    Indexed,
    /// The query that calls the function made slower.
    Slowed,
    /// The query that waits for row locks.
    Locked,
}

/// How a workload names what an injected regression hits.
pub trait Subjects {
    /// Whether a query finding is about the statement `hit`.
    fn is_statement(&self, finding: &Finding, hit: Hit) -> bool;
    /// The table read by sequential scans once its index is dropped.
    fn scanned_table(&self) -> String;
}

impl Scenario {
    pub fn name(self) -> String {
        match self {
            Scenario::NoChange => "no change".into(),
            Scenario::TrafficDouble => "traffic x2 at the deployment".into(),
            Scenario::TrafficQuarter => "traffic x1/4 at the deployment".into(),
            Scenario::StatementsReset => "pg_stat_statements_reset()".into(),
            Scenario::Restart => "server restart (cold cache)".into(),
            Scenario::NewQueries => "new queries".into(),
            Scenario::Vacuum => "VACUUM + CHECKPOINT".into(),
            Scenario::IndexDrop => "index drop".into(),
            Scenario::Slower(f) => format!("a function {f}x slower"),
            Scenario::FailingConstraint => "constraint failing in some transactions".into(),
            Scenario::LockContention => "row-lock contention (intermittent waits)".into(),
            Scenario::Integrity(w) => format!("integrity violation in {}", w.as_str()),
        }
    }

    /// Whether the change is one the rules must not call a regression.
    pub fn harmless(self) -> bool {
        matches!(
            self,
            Scenario::NoChange
                | Scenario::TrafficDouble
                | Scenario::TrafficQuarter
                | Scenario::StatementsReset
                | Scenario::Restart
                | Scenario::NewQueries
                | Scenario::Vacuum
        )
    }

    /// Whether a finding is the injected regression.
    pub fn is_the_regression(self, f: &Finding, workload: &impl Subjects) -> bool {
        let query = |hit: Hit| {
            matches!(f.signal, Signal::QueryLatency | Signal::TopQueries)
                && workload.is_statement(f, hit)
        };
        match self {
            Scenario::IndexDrop => {
                query(Hit::Indexed)
                    || (f.signal == Signal::SeqScans && f.subject == workload.scanned_table())
            }
            Scenario::Slower(_) => query(Hit::Slowed),
            Scenario::LockContention => query(Hit::Locked),
            Scenario::FailingConstraint => f.signal == Signal::RollbackRatio,
            Scenario::Integrity(_) => {
                matches!(f.signal, Signal::CheckFailure | Signal::Integrity)
            }
            _ => false,
        }
    }

    /// The window where the injected regression starts.
    pub fn starts_in(self) -> Window {
        match self {
            Scenario::Integrity(w) => w,
            _ => Window::FirstHour,
        }
    }
}
