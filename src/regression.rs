//! STUB
use crate::deployment::Finding;
use crate::sample::Sample;
use crate::window::Window;
pub struct Thresholds { pub latency_min_increase: f64, pub latency_min_calls: u64, pub latency_p_value: f64, pub min_samples: usize }
pub struct Judgement { pub regressions: Vec<Finding>, pub improvements: Vec<Finding> }
pub fn judge(_w: Window, _b: &[Sample], _ws: &[Sample], _s: &[Sample], _c: bool, _t: &Thresholds) -> Judgement { Judgement { regressions: vec![], improvements: vec![] } }
