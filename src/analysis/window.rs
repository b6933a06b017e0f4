//! Window arithmetic of the checklist's post-deployment watch: the first hour, the first 24
//! hours, the first week, then steady state, all measured from the deployment; the verdict a
//! window shows; and the span of the baseline before a deployment. Pure: times are passed in.

use crate::labels::label_enum;
use std::time::Duration;

use crate::time::Timestamp;

label_enum! {
    pub enum Window {
        FirstHour,
        FirstDay,
        FirstWeek,
        Steady,
    }
}

/// Where each window ends, measured from the deployment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowDurations {
    pub first_hour: Duration,
    pub first_day: Duration,
    pub first_week: Duration,
}

impl Default for WindowDurations {
    fn default() -> Self {
        WindowDurations {
            first_hour: Duration::from_secs(3600),
            first_day: Duration::from_secs(24 * 3600),
            first_week: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum WindowError {
    #[error(
        "windows must end in order: 0 < first_hour ({first_hour:?}) < first_day ({first_day:?}) < first_week ({first_week:?})"
    )]
    OutOfOrder {
        first_hour: Duration,
        first_day: Duration,
        first_week: Duration,
    },
}

impl WindowDurations {
    pub(crate) fn validate(&self) -> Result<(), WindowError> {
        if self.first_hour.is_zero()
            || self.first_hour >= self.first_day
            || self.first_day >= self.first_week
        {
            return Err(WindowError::OutOfOrder {
                first_hour: self.first_hour,
                first_day: self.first_day,
                first_week: self.first_week,
            });
        }
        Ok(())
    }
}

/// Start and end (exclusive) of a window; steady has no end.
pub(crate) fn bounds(
    window: Window,
    deployed_at: Timestamp,
    d: &WindowDurations,
) -> (Timestamp, Option<Timestamp>) {
    let at = |duration: Duration| deployed_at + duration.as_secs_f64();
    match window {
        Window::FirstHour => (deployed_at, Some(at(d.first_hour))),
        Window::FirstDay => (at(d.first_hour), Some(at(d.first_day))),
        Window::FirstWeek => (at(d.first_day), Some(at(d.first_week))),
        Window::Steady => (at(d.first_week), None),
    }
}

/// The window `now` falls in; `None` before the deployment.
pub(crate) fn window_at(
    deployed_at: Timestamp,
    now: Timestamp,
    d: &WindowDurations,
) -> Option<Window> {
    if now < deployed_at {
        return None;
    }
    Window::ALL.iter().copied().find(|w| {
        let (start, end) = bounds(*w, deployed_at, d);
        now >= start && end.is_none_or(|e| now < e)
    })
}

label_enum! {
    pub enum Verdict {
        Watching,
        Pass,
        Regression,
        Inconclusive,
    }
}

/// A window with a confirmed regression (found at two consecutive looks, or there when the
/// window closed) shows `regression`, and keeps showing it once the flag resolves; a flag seen
/// at one look only keeps an open window `watching`. A closed window without one is `pass` or,
/// with too few samples, `inconclusive`.
pub fn verdict(closed: bool, confirmed: usize, samples: usize, min_samples: usize) -> Verdict {
    if confirmed > 0 {
        Verdict::Regression
    } else if !closed {
        Verdict::Watching
    } else if samples < min_samples {
        Verdict::Inconclusive
    } else {
        Verdict::Pass
    }
}

/// The baseline is `[max(deployed_at - span, previous deployment), deployed_at)`.
pub fn baseline_range(
    deployed_at: Timestamp,
    span: Duration,
    previous_deployment: Option<Timestamp>,
) -> (Timestamp, Timestamp) {
    let start = deployed_at - span.as_secs_f64();
    let start = match previous_deployment {
        Some(previous) if previous > start && previous < deployed_at => previous,
        _ => start,
    };
    (start, deployed_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> WindowDurations {
        WindowDurations::default()
    }

    fn check(seconds_after: f64, expected: Option<Window>) {
        assert_eq!(
            window_at(1000.0, 1000.0 + seconds_after, &d()),
            expected,
            "{seconds_after}"
        );
    }

    #[test]
    fn windows_follow_the_checklist() {
        check(-1.0, None);
        check(0.0, Some(Window::FirstHour));
        check(3599.0, Some(Window::FirstHour));
        check(3600.0, Some(Window::FirstDay));
        check(86_399.0, Some(Window::FirstDay));
        check(86_400.0, Some(Window::FirstWeek));
        check(7.0 * 86_400.0 - 1.0, Some(Window::FirstWeek));
        check(7.0 * 86_400.0, Some(Window::Steady));
        check(400.0 * 86_400.0, Some(Window::Steady));
    }

    #[test]
    fn bounds_contain_the_time_that_picked_them() {
        for step in 0..2000 {
            let t = 1000.0 + f64::from(step) * 401.3;
            let window = window_at(1000.0, t, &d()).expect("after");
            let (start, end) = bounds(window, 1000.0, &d());
            assert!(start <= t && end.is_none_or(|e| t < e), "{t} {window:?}");
        }
    }

    #[test]
    fn windows_never_go_backwards_in_time() {
        let mut last = Window::FirstHour;
        for step in 0..2000 {
            let window = window_at(0.0, f64::from(step) * 401.3, &d()).expect("after");
            assert!(window >= last);
            last = window;
        }
    }

    #[test]
    fn verdicts() {
        assert_eq!(verdict(false, 0, 0, 3), Verdict::Watching);
        assert_eq!(verdict(false, 1, 0, 3), Verdict::Regression);
        assert_eq!(verdict(true, 0, 2, 3), Verdict::Inconclusive);
        assert_eq!(verdict(true, 0, 3, 3), Verdict::Pass);
        assert_eq!(verdict(true, 2, 10, 3), Verdict::Regression);
    }

    #[test]
    fn validation_wants_increasing_ends() {
        assert!(d().validate().is_ok());
        let bad = WindowDurations {
            first_hour: Duration::from_secs(10),
            first_day: Duration::from_secs(5),
            first_week: Duration::from_secs(20),
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn the_baseline_stops_at_the_previous_deployment() {
        let span = Duration::from_secs(100);
        assert_eq!(baseline_range(1000.0, span, None), (900.0, 1000.0));
        assert_eq!(baseline_range(1000.0, span, Some(950.0)), (950.0, 1000.0));
        assert_eq!(baseline_range(1000.0, span, Some(500.0)), (900.0, 1000.0));
    }
}
