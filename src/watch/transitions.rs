//! Which results are worth a log line: a change of state (pass → fail, fail → pass, a new error
//! kind), and while something stays wrong, a reminder at most once an hour. Everything else is
//! already counted in metrics and logged at `debug` only. The caller passes the time, so the
//! rules are tested without waiting.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a state that stays bad is logged again.
pub(crate) const REMINDER_EVERY: Duration = Duration::from_secs(3600);

/// What a new observation is, compared with the last one of the same subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The first observation of this subject.
    First,
    /// The state differs from the previous one.
    Changed { previous: String },
    /// The same state, and it has not been logged for [`REMINDER_EVERY`].
    Reminder { since: Duration },
    /// The same state, logged recently.
    Same,
}

impl Transition {
    /// Whether this observation deserves a line at `info`/`warn`, given whether its state is
    /// a good one (a pass, a readable version).
    pub(crate) fn worth_logging(&self, good: bool) -> bool {
        match self {
            Transition::First => !good,
            Transition::Changed { .. } => true,
            Transition::Reminder { .. } => !good,
            Transition::Same => false,
        }
    }
}

#[derive(Debug)]
struct Seen {
    state: String,
    since: Instant,
    logged: Instant,
}

/// The last state of each subject (a target and a check, or a target and a sampling step).
#[derive(Debug, Default)]
pub struct Transitions {
    /// By target, then subject: looked up without allocating, as every run is observed.
    seen: Mutex<HashMap<String, HashMap<String, Seen>>>,
}

impl Transitions {
    pub fn observe(&self, target: &str, subject: &str, state: &str, now: Instant) -> Transition {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let subjects = match seen.get_mut(target) {
            Some(subjects) => subjects,
            None => seen.entry(target.to_string()).or_default(),
        };
        match subjects.get_mut(subject) {
            None => {
                subjects.insert(
                    subject.to_string(),
                    Seen {
                        state: state.to_string(),
                        since: now,
                        logged: now,
                    },
                );
                Transition::First
            }
            Some(last) if last.state != state => {
                let previous = std::mem::replace(&mut last.state, state.to_string());
                last.since = now;
                last.logged = now;
                Transition::Changed { previous }
            }
            Some(last) if now.saturating_duration_since(last.logged) >= REMINDER_EVERY => {
                last.logged = now;
                Transition::Reminder {
                    since: now.saturating_duration_since(last.since),
                }
            }
            Some(_) => Transition::Same,
        }
    }

    /// Forgets the subjects of targets no longer configured.
    pub(crate) fn retain_targets(&self, keep: impl Fn(&str) -> bool) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|target, _| keep(target));
    }
}

/// How often the late runs of one server are summed up in a log line.
pub(crate) const LATE_SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// What a run of a server's queue was, for [`LateRuns`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Punctuality<'a> {
    /// It got its session when it was due.
    OnTime,
    /// It waited `waited` for a session, past `merged` of its due times; `what` names it.
    Late {
        what: &'a str,
        waited: Duration,
        merged: u64,
    },
}

/// A log line about the late runs of one server.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum LateLine {
    /// Its first late run after a time with none.
    Started {
        what: String,
        waited: Duration,
        merged: u64,
    },
    /// The late runs since the last line (`over` ago): how many, the due runs merged into
    /// them, the runs on time meanwhile and the longest wait, with the run that waited it.
    Summary {
        runs: u64,
        merged: u64,
        on_time: u64,
        worst_wait: Duration,
        worst: String,
        over: Duration,
    },
    /// A whole period of runs on time after late ones.
    OnTimeAgain { runs: u64 },
}

#[derive(Debug)]
struct LateWindow {
    since: Instant,
    runs: u64,
    merged: u64,
    on_time: u64,
    worst: Option<(Duration, String)>,
    /// Whether the previous period (or line) had late runs.
    was_late: bool,
}

/// Runs that start late for lack of a session, summed up per server: a line when a server's
/// runs start being late, then at most one per [`LATE_SUMMARY_EVERY`] with the counts and the
/// longest wait, and one when a whole period ran on time again. With a budget too small for a
/// fleet, thousands of checks run late every minute: each is counted in the metrics
/// (`deploywatch_check_delayed_total`) and shown in `/status`, and the log stays readable.
#[derive(Debug, Default)]
pub(crate) struct LateRuns {
    servers: Mutex<HashMap<String, LateWindow>>,
}

impl LateRuns {
    /// Takes note of a run of `server` at `now`; returns the line to log, if one is due.
    pub(crate) fn observe(
        &self,
        server: &str,
        run: Punctuality<'_>,
        now: Instant,
    ) -> Option<LateLine> {
        let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        let window = match servers.get_mut(server) {
            Some(window) => window,
            None => servers.entry(server.to_string()).or_insert(LateWindow {
                since: now,
                runs: 0,
                merged: 0,
                on_time: 0,
                worst: None,
                was_late: false,
            }),
        };
        match run {
            Punctuality::OnTime => window.on_time += 1,
            Punctuality::Late {
                what,
                waited,
                merged,
            } => {
                if !window.was_late && window.runs == 0 {
                    *window = LateWindow {
                        since: now,
                        runs: 0,
                        merged: 0,
                        on_time: 0,
                        worst: None,
                        was_late: true,
                    };
                    return Some(LateLine::Started {
                        what: what.to_string(),
                        waited,
                        merged,
                    });
                }
                window.runs += 1;
                window.merged += merged;
                if window.worst.as_ref().is_none_or(|(w, _)| waited > *w) {
                    window.worst = Some((waited, what.to_string()));
                }
            }
        }
        let over = now.saturating_duration_since(window.since);
        if over < LATE_SUMMARY_EVERY {
            return None;
        }
        let line = match window.worst.take() {
            Some((worst_wait, worst)) => Some(LateLine::Summary {
                runs: window.runs,
                merged: window.merged,
                on_time: window.on_time,
                worst_wait,
                worst,
                over,
            }),
            None if window.was_late => Some(LateLine::OnTimeAgain {
                runs: window.on_time,
            }),
            None => None,
        };
        *window = LateWindow {
            since: now,
            runs: 0,
            merged: 0,
            on_time: 0,
            worst: None,
            was_late: window.runs > 0,
        };
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_runs_are_summed_up_per_server_once_a_minute() {
        let late = LateRuns::default();
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let run = |what: &'static str, waited: u64| Punctuality::Late {
            what,
            waited: Duration::from_secs(waited),
            merged: 1,
        };
        // Runs on time say nothing.
        assert_eq!(late.observe("a:5432", Punctuality::OnTime, at(0)), None);
        assert_eq!(
            late.observe("a:5432", Punctuality::OnTime, at(70_000)),
            None
        );
        // The first late run is told at once.
        assert_eq!(
            late.observe("a:5432", run("tenant_1 c", 40), at(71_000)),
            Some(LateLine::Started {
                what: "tenant_1 c".into(),
                waited: Duration::from_secs(40),
                merged: 1
            })
        );
        // Ten minutes of 100 late runs a second (and some on time), on two servers: one line
        // per server per minute, with the counts and the worst wait.
        let mut lines = Vec::new();
        for ms in (71_010..671_000).step_by(10) {
            let what = if ms == 100_000 {
                "tenant_9 worst"
            } else {
                "tenant_2 c"
            };
            let waited = if ms == 100_000 { 90 } else { 30 };
            lines.extend(late.observe("a:5432", run(what, waited), at(ms)));
            if ms % 1000 == 0 {
                lines.extend(late.observe("a:5432", Punctuality::OnTime, at(ms)));
            }
        }
        assert_eq!(lines.len(), 9, "{lines:?}");
        let first_minute = LateLine::Summary {
            runs: 6000,
            merged: 6000,
            on_time: 59,
            worst_wait: Duration::from_secs(90),
            worst: "tenant_9 worst".to_string(),
            over: Duration::from_secs(60),
        };
        assert_eq!(lines[0], first_minute);
        // Another server's late runs are its own.
        assert!(matches!(
            late.observe("b:5432", run("tenant_1 c", 40), at(671_000)),
            Some(LateLine::Started { .. })
        ));
        // Back on time: the last late ones summed up, then one line for a whole minute on time.
        let mut after = Vec::new();
        for second in 672..800 {
            after.extend(late.observe("a:5432", Punctuality::OnTime, at(second * 1000)));
        }
        assert!(
            matches!(
                after[..],
                [LateLine::Summary { .. }, LateLine::OnTimeAgain { runs: 60 }]
            ),
            "{after:?}"
        );
        // And late again later: told at once.
        assert!(matches!(
            late.observe("a:5432", run("tenant_1 c", 40), at(900_000)),
            Some(LateLine::Started { .. })
        ));
    }

    #[test]
    fn a_server_with_few_late_runs_gets_no_more_lines_than_runs() {
        let late = LateRuns::default();
        let start = Instant::now();
        let late_run = Punctuality::Late {
            what: "tenant_1 c",
            waited: Duration::from_secs(31),
            merged: 1,
        };
        assert!(late.observe("a", late_run, start).is_some());
        assert_eq!(
            late.observe("a", late_run, start + Duration::from_secs(1)),
            None
        );
        // The next run, a minute later, closes the period with the one late run in it.
        assert!(matches!(
            late.observe("a", Punctuality::OnTime, start + Duration::from_secs(61)),
            Some(LateLine::Summary { runs: 1, .. })
        ));
    }

    #[test]
    fn a_failing_check_is_logged_on_change_and_then_hourly() {
        let t = Transitions::default();
        let start = Instant::now();
        let at = |minutes: u64| start + Duration::from_secs(60 * minutes);
        assert_eq!(t.observe("db", "c", "pass", at(0)), Transition::First);
        assert!(!t.observe("db", "c", "pass", at(1)).worth_logging(true));
        let failed = t.observe("db", "c", "fail", at(2));
        assert_eq!(
            failed,
            Transition::Changed {
                previous: "pass".into()
            }
        );
        // A day of one-minute runs that keep failing: one line when it broke, then hourly.
        let mut lines = 1;
        for minute in 3..(2 + 24 * 60) {
            if t.observe("db", "c", "fail", at(minute))
                .worth_logging(false)
            {
                lines += 1;
            }
        }
        assert_eq!(lines, 24);
        // A new error kind is a change; so is the way back to pass.
        assert!(t
            .observe("db", "c", "error:timeout", at(2000))
            .worth_logging(false));
        assert!(t.observe("db", "c", "pass", at(2001)).worth_logging(true));
        assert!(!t.observe("db", "c", "pass", at(3000)).worth_logging(true));
    }

    #[test]
    fn subjects_are_independent() {
        let t = Transitions::default();
        let now = Instant::now();
        assert_eq!(t.observe("a", "c", "fail", now), Transition::First);
        assert_eq!(t.observe("b", "c", "fail", now), Transition::First);
        assert_eq!(t.observe("a", "d", "fail", now), Transition::First);
        assert_eq!(t.observe("a", "c", "fail", now), Transition::Same);
    }
}
