//! Time has one owner: this module. A [`Timestamp`] is Unix time in seconds (fractional), the
//! one representation every layer uses, in memory, in the store and in evidence. "Now" comes
//! from a [`Clock`], which the daemon is given, so tests can drive time instead of sleeping.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Unix time in seconds.
pub(crate) type Timestamp = f64;

/// Where "now" comes from.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> Timestamp;
}

/// The clock every component holds.
pub(crate) type SharedClock = Arc<dyn Clock>;

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        unix_now()
    }
}

/// The system clock, shared.
pub(crate) fn system_clock() -> SharedClock {
    Arc::new(SystemClock)
}

/// A clock that moves only when told to: for tests and simulations.
#[derive(Debug, Default)]
pub struct ManualClock {
    bits: AtomicU64,
}

impl ManualClock {
    pub fn new(start: Timestamp) -> ManualClock {
        ManualClock {
            bits: AtomicU64::new(start.to_bits()),
        }
    }

    pub(crate) fn set(&self, at: Timestamp) {
        self.bits.store(at.to_bits(), Ordering::SeqCst);
    }

    pub fn advance(&self, by: Duration) {
        self.set(self.now() + by.as_secs_f64());
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        f64::from_bits(self.bits.load(Ordering::SeqCst))
    }
}

/// The system clock's reading. Components take a [`Clock`]; this is what [`SystemClock`] reads.
pub fn unix_now() -> Timestamp {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// RFC 3339 in UTC, to the second (`2026-11-26T02:18:40Z`).
pub fn rfc3339(ts: Timestamp) -> String {
    let time = UNIX_EPOCH + Duration::from_secs_f64(ts.max(0.0));
    humantime::format_rfc3339_seconds(time).to_string()
}

/// Parses RFC 3339 (`2026-11-26T02:18:40Z`, with or without fractions) into a [`Timestamp`].
pub fn parse_rfc3339(text: &str) -> Result<Timestamp, humantime::TimestampError> {
    let time = humantime::parse_rfc3339_weak(text)?;
    Ok(time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0))
}

/// Parses a human duration (`500ms`, `30s`, `5m`, `1h`, `7d`).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(text.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(1000.0);
        assert_eq!(clock.now(), 1000.0);
        clock.advance(Duration::from_millis(1500));
        assert_eq!(clock.now(), 1001.5);
        clock.set(5.0);
        assert_eq!(clock.now(), 5.0);
    }

    #[test]
    fn rfc3339_round_trips_to_the_second() {
        let at = 1_764_123_520.0;
        let text = rfc3339(at);
        assert_eq!(text, "2025-11-26T02:18:40Z");
        assert_eq!(parse_rfc3339(&text).unwrap(), at);
    }

    #[test]
    fn durations_are_human() {
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(
            parse_duration(" 500ms ").unwrap(),
            Duration::from_millis(500)
        );
        assert!(parse_duration("soon").is_err());
    }
}
