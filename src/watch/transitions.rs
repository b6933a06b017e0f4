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
    seen: Mutex<HashMap<(String, String), Seen>>,
}

impl Transitions {
    pub fn observe(&self, target: &str, subject: &str, state: &str, now: Instant) -> Transition {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let key = (target.to_string(), subject.to_string());
        match seen.get_mut(&key) {
            None => {
                seen.insert(
                    key,
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
        seen.retain(|(target, _), _| keep(target));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
