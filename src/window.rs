//! STUB
use std::time::Duration;
use serde::{Serialize, Deserialize};
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Window { FirstHour, FirstDay, FirstWeek, Steady }
impl Window { pub const ALL: [Window; 4] = [Window::FirstHour, Window::FirstDay, Window::FirstWeek, Window::Steady]; pub fn as_str(self) -> &'static str { "x" } }
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict { Watching, Pass, Regression, Inconclusive }
impl Verdict { pub const ALL: [Verdict; 4] = [Verdict::Watching, Verdict::Pass, Verdict::Regression, Verdict::Inconclusive]; pub fn as_str(self) -> &'static str { "x" } }
#[derive(Debug, Clone, Copy)]
pub struct WindowDurations { pub first_hour: Duration, pub first_day: Duration, pub first_week: Duration }
impl Default for WindowDurations { fn default() -> Self { WindowDurations { first_hour: Duration::from_secs(1), first_day: Duration::from_secs(2), first_week: Duration::from_secs(3) } } }
#[derive(Debug, thiserror::Error)] pub enum WindowError { #[error("x")] X }
impl WindowDurations { pub fn validate(&self) -> Result<(), WindowError> { Ok(()) } }
pub type UnixSeconds = f64;
pub fn bounds(_w: Window, a: f64, _d: &WindowDurations) -> (f64, Option<f64>) { (a, None) }
pub fn window_at(_a: f64, _n: f64, _d: &WindowDurations) -> Option<Window> { None }
pub fn verdict(_c: bool, _r: usize, _s: usize, _m: usize) -> Verdict { Verdict::Watching }
pub fn baseline_range(a: f64, _s: Duration, _p: Option<f64>) -> (f64, f64) { (a, a) }
