//! Statistics for regression detection: central values, relative change and the Mann–Whitney U
//! test that automated canary analysis uses to compare a window with its baseline without
//! assuming a distribution. Pure math; no NaN ever leaves this module.

/// Arithmetic mean; `None` for no values.
pub fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Percentile `p` in [0, 100] with linear interpolation between closest ranks.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let v = sorted(values);
    if v.is_empty() {
        return None;
    }
    let p = p.clamp(0.0, 100.0) / 100.0;
    let position = p * (v.len() - 1) as f64;
    let low = position.floor() as usize;
    let high = position.ceil() as usize;
    let fraction = position - low as f64;
    Some(v[low] + (v[high] - v[low]) * fraction)
}

pub fn median(values: &[f64]) -> Option<f64> {
    percentile(values, 50.0)
}

/// `(current - baseline) / baseline`; `None` when the baseline is zero or not finite.
pub fn relative_change(baseline: f64, current: f64) -> Option<f64> {
    if baseline == 0.0 || !baseline.is_finite() || !current.is_finite() {
        return None;
    }
    Some((current - baseline) / baseline.abs())
}

/// The result of a Mann–Whitney U test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MannWhitney {
    /// U of the window sample.
    pub u: f64,
    /// Normal approximation with tie and continuity correction, positive when the window
    /// values tend to be larger.
    pub z: f64,
    /// One-sided p-value for "window values are stochastically greater than baseline".
    pub p_greater: f64,
    pub p_two_sided: f64,
    pub n_baseline: usize,
    pub n_window: usize,
}

/// Mann–Whitney U test of `window` against `baseline`. `None` when either side is empty.
pub fn mann_whitney(baseline: &[f64], window: &[f64]) -> Option<MannWhitney> {
    let baseline: Vec<f64> = baseline.iter().copied().filter(|x| x.is_finite()).collect();
    let window: Vec<f64> = window.iter().copied().filter(|x| x.is_finite()).collect();
    let (n1, n2) = (baseline.len(), window.len());
    if n1 == 0 || n2 == 0 {
        return None;
    }
    // Rank all values together; ties get the average of the ranks they span.
    let mut all: Vec<(f64, bool)> = baseline
        .iter()
        .map(|v| (*v, false))
        .chain(window.iter().map(|v| (*v, true)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = all.len();
    let mut rank_sum_window = 0.0;
    let mut tie_term = 0.0;
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let count = (j - i + 1) as f64;
        let average_rank = (i + j) as f64 / 2.0 + 1.0;
        for item in &all[i..=j] {
            if item.1 {
                rank_sum_window += average_rank;
            }
        }
        tie_term += count * count * count - count;
        i = j + 1;
    }
    let (n1f, n2f, nf) = (n1 as f64, n2 as f64, n as f64);
    let u = rank_sum_window - n2f * (n2f + 1.0) / 2.0;
    let mean_u = n1f * n2f / 2.0;
    let variance = n1f * n2f / 12.0 * ((nf + 1.0) - tie_term / (nf * (nf - 1.0)).max(1.0));
    let (z, p_greater, p_two_sided) = if variance <= 0.0 || !variance.is_finite() {
        (0.0, 1.0, 1.0)
    } else {
        let sd = variance.sqrt();
        let difference = u - mean_u;
        // Continuity correction towards the mean.
        let z_greater = (difference - 0.5) / sd;
        let z_two = (difference.abs() - 0.5).max(0.0) / sd;
        let z = difference / sd;
        (
            z,
            normal_sf(z_greater).clamp(0.0, 1.0),
            (2.0 * normal_sf(z_two)).clamp(0.0, 1.0),
        )
    };
    Some(MannWhitney {
        u,
        z,
        p_greater,
        p_two_sided,
        n_baseline: n1,
        n_window: n2,
    })
}

/// Survival function of the standard normal distribution, `P(Z > z)`.
pub fn normal_sf(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// Complementary error function (Numerical Recipes' Chebyshev fit, |error| < 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance
    }

    #[test]
    fn central_values() {
        assert_eq!(mean(&[]), None);
        assert_eq!(mean(&[1.0, 2.0, 3.0]), Some(2.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0, 5.0], 90.0), Some(4.6));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(relative_change(2.0, 3.0), Some(0.5));
        assert_eq!(relative_change(0.0, 3.0), None);
    }

    #[test]
    fn normal_tail_matches_tables() {
        assert!(close(normal_sf(0.0), 0.5, 1e-7));
        assert!(close(normal_sf(1.959_964), 0.025, 1e-6));
        assert!(close(normal_sf(-1.644_854), 0.95, 1e-6));
        assert!(close(normal_sf(3.090_232), 0.001, 1e-6));
    }

    /// Known answers from scipy.stats.mannwhitneyu(window, baseline, alternative="greater",
    /// use_continuity=True, method="asymptotic").
    #[test]
    fn mann_whitney_known_answers() {
        // No overlap: window all larger. scipy: U = 25, p = 0.006093, two-sided 0.012186.
        let r =
            mann_whitney(&[1.0, 2.0, 3.0, 4.0, 5.0], &[6.0, 7.0, 8.0, 9.0, 10.0]).expect("test");
        assert_eq!(r.u, 25.0);
        assert!(close(r.p_greater, 0.006_093, 1e-6), "{r:?}");
        assert!(close(r.p_two_sided, 0.012_186, 1e-6), "{r:?}");
        // Window all smaller: not greater.
        let r =
            mann_whitney(&[6.0, 7.0, 8.0, 9.0, 10.0], &[1.0, 2.0, 3.0, 4.0, 5.0]).expect("test");
        assert_eq!(r.u, 0.0);
        assert!(r.p_greater > 0.99, "{r:?}");
        // Interleaved with a tie (window 2, 4, 6, 8 vs baseline 1, 3, 5, 7, 8). scipy: U = 10.5,
        // p = 0.5.
        let r = mann_whitney(&[1.0, 3.0, 5.0, 7.0, 8.0], &[2.0, 4.0, 6.0, 8.0]).expect("test");
        assert_eq!(r.u, 10.5);
        assert!(close(r.p_greater, 0.5, 1e-6), "{r:?}");
    }

    #[test]
    fn all_ties_and_empty_sides_never_give_nan() {
        let r = mann_whitney(&[1.0, 1.0, 1.0], &[1.0, 1.0]).expect("test");
        assert_eq!((r.z, r.p_greater, r.p_two_sided), (0.0, 1.0, 1.0));
        assert!(mann_whitney(&[], &[1.0]).is_none());
        assert!(mann_whitney(&[1.0], &[]).is_none());
        let r = mann_whitney(&[1.0], &[2.0]).expect("test");
        assert!(r.p_greater.is_finite());
    }
}
