//! Statistics for regression detection: central values, relative change and the Mann–Whitney U
//! test that automated canary analysis uses to compare a window with its baseline without
//! assuming a distribution; running moments in constant memory and the mixture sequential
//! probability ratio test whose p-values stay valid however often a growing window is looked
//! at. Pure math; no NaN ever leaves this module.

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Percentile `p` in [0, 100] with linear interpolation between closest ranks. Selects the two
/// ranks it needs instead of sorting (linear time: it runs for every followed statement on
/// every judging pass).
fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    let p = p.clamp(0.0, 100.0) / 100.0;
    let position = p * (v.len() - 1) as f64;
    let low = position.floor() as usize;
    let high = position.ceil() as usize;
    let fraction = position - low as f64;
    let (_, at_low, above) = v.select_nth_unstable_by(low, f64::total_cmp);
    let at_low = *at_low;
    let at_high = if high == low {
        at_low
    } else {
        above
            .iter()
            .copied()
            .min_by(f64::total_cmp)
            .unwrap_or(at_low)
    };
    Some(at_low + (at_high - at_low) * fraction)
}

/// The middle value, or halfway between the middle two; `None` for no values.
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
    /// Whether the p-values are exact (small samples without ties).
    pub exact: bool,
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
    // Small samples without ties: the exact null distribution of U, not the normal
    // approximation, which is poor in the tails that matter here.
    let exact = tie_term == 0.0 && n <= EXACT_MAX_N;
    let (p_greater, p_two_sided) = if exact {
        let exact_greater = exact_u_tail(n1, n2, u);
        let exact_less = exact_u_tail(n1, n2, n1f * n2f - u);
        (
            exact_greater,
            (2.0 * exact_greater.min(exact_less)).min(1.0),
        )
    } else {
        (p_greater, p_two_sided)
    };
    Some(MannWhitney {
        u,
        z,
        p_greater,
        p_two_sided,
        n_baseline: n1,
        n_window: n2,
        exact,
    })
}

/// Largest total sample size for which Mann–Whitney p-values are computed exactly.
pub const EXACT_MAX_N: usize = 60;

/// `P(U >= u)` under the null hypothesis for samples of `n1` and `n2` values without ties, U
/// counting the (baseline, window) pairs where the window value is larger: the share of the
/// `C(n1 + n2, n2)` equally likely arrangements. Counts by dynamic programming over the number
/// of window values among the smallest k values and their U so far.
pub fn exact_u_tail(n1: usize, n2: usize, u: f64) -> f64 {
    let ways = exact_u_counts(n1, n2);
    let total: f64 = ways.iter().sum();
    if total <= 0.0 {
        return 1.0;
    }
    let threshold = u.ceil().max(0.0) as usize;
    let tail: f64 = ways.iter().skip(threshold).sum();
    (tail / total).clamp(0.0, 1.0)
}

/// The number of arrangements of `n1` baseline and `n2` window values (no ties) giving each U
/// from 0 to `n1 * n2`.
fn exact_u_counts(n1: usize, n2: usize) -> Vec<f64> {
    let max_u = n1 * n2;
    // ways[j][v]: arrangements of the first k values with j window values and U = v.
    let mut ways = vec![vec![0.0f64; max_u + 1]; n2 + 1];
    ways[0][0] = 1.0;
    for k in 0..(n1 + n2) {
        // Going down in j so each value is used once. A window value placed at position k
        // (0-based) beats the k - j baseline values before it.
        for j in (0..n2.min(k + 1)).rev() {
            let baseline_before = k - j;
            if baseline_before > n1 {
                continue;
            }
            for v in (0..=max_u).rev() {
                let w = ways[j][v];
                if w != 0.0 && v + baseline_before <= max_u {
                    ways[j + 1][v + baseline_before] += w;
                }
            }
        }
    }
    ways.swap_remove(n2)
}

/// The Hodges–Lehmann estimate of the shift from `baseline` to `window` (the median of all
/// pairwise differences window - baseline) with its distribution-free confidence interval at
/// `confidence` (e.g. 0.95): the Mann–Whitney test inverted, from U's exact distribution for
/// up to `EXACT_MAX_N` values in all (where the normal approximation's interval is too narrow)
/// and from its normal approximation above.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HodgesLehmann {
    pub shift: f64,
    pub low: f64,
    pub high: f64,
    pub confidence: f64,
}

pub fn hodges_lehmann(baseline: &[f64], window: &[f64], confidence: f64) -> Option<HodgesLehmann> {
    let baseline = sorted(baseline);
    let window = sorted(window);
    if baseline.is_empty() || window.is_empty() {
        return None;
    }
    // The order statistics of the n1 * n2 differences are selected, not sorted: 512 values a
    // side are 262,144 differences, too many to sort on every look.
    let m = baseline.len() * window.len();
    let kth = |k: usize| kth_difference(&baseline, &window, k);
    // The median as `median` takes it: the middle one, or halfway between the middle two.
    let position = 0.5 * (m - 1) as f64;
    let (low, high) = (position.floor() as usize, position.ceil() as usize);
    let at_low = kth(low);
    let at_high = if high == low { at_low } else { kth(high) };
    let shift = at_low + (at_high - at_low) * (position - low as f64);
    let k = interval_rank(baseline.len(), window.len(), confidence).min(m - 1);
    Some(HodgesLehmann {
        shift,
        low: kth(k),
        high: kth(m - 1 - k),
        confidence,
    })
}

/// How many of the `n1 * n2` pairwise differences lie below the Hodges–Lehmann interval at
/// `confidence` (and as many above): the largest k with P(U < k) ≤ (1 - confidence) / 2, so
/// the interval from the (k+1)-th smallest difference to the (k+1)-th largest covers the shift
/// with at least that confidence. Exact up to `EXACT_MAX_N` values in all.
fn interval_rank(n1: usize, n2: usize, confidence: f64) -> usize {
    let alpha_half = (1.0 - confidence.clamp(0.0, 0.999_999)) / 2.0;
    if n1 + n2 <= EXACT_MAX_N {
        let ways = exact_u_counts(n1, n2);
        let total: f64 = ways.iter().sum();
        let mut below = 0.0;
        let mut k = 0;
        // Count the values of U (from 0) whose lower tail P(U <= u) stays within alpha / 2;
        // the largest such u is the index of the lower bound.
        while k < ways.len() && (below + ways[k]) / total <= alpha_half {
            below += ways[k];
            k += 1;
        }
        return k.saturating_sub(1);
    }
    let (n1, n2) = (n1 as f64, n2 as f64);
    let z = normal_quantile(0.5 + confidence.clamp(0.0, 0.999_999) / 2.0);
    let spread = z * (n1 * n2 * (n1 + n2 + 1.0) / 12.0).sqrt();
    (n1 * n2 / 2.0 - spread).floor().max(0.0) as usize
}

/// A key that orders finite doubles as `total_cmp` does.
fn order_key(x: f64) -> u64 {
    let bits = x.to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    }
}

fn from_order_key(key: u64) -> f64 {
    f64::from_bits(if key >> 63 == 1 {
        key & !(1 << 63)
    } else {
        !key
    })
}

/// The `k`-th smallest (0-based) of the differences `w - b` over every pair of the sorted,
/// finite `baseline` and `window`, without forming them: a binary search over the doubles for
/// the smallest value that at least `k + 1` differences do not exceed, each step counting in
/// one merge-like walk, O((n1 + n2) · 64).
fn kth_difference(baseline: &[f64], window: &[f64], k: usize) -> f64 {
    // Differences not above `v`. For each window value the baseline values that qualify are a
    // suffix, whose start only moves right as the window value grows.
    let count = |v: f64| {
        let mut start = 0;
        let mut total = 0usize;
        for w in window {
            while start < baseline.len() && w - baseline[start] > v {
                start += 1;
            }
            total += baseline.len() - start;
        }
        total
    };
    let (Some(first_b), Some(last_b), Some(first_w), Some(last_w)) = (
        baseline.first(),
        baseline.last(),
        window.first(),
        window.last(),
    ) else {
        return 0.0;
    };
    let (mut low, mut high) = (order_key(first_w - last_b), order_key(last_w - first_b));
    while low < high {
        let middle = low + (high - low) / 2;
        if count(from_order_key(middle)) > k {
            high = middle;
        } else {
            low = middle + 1;
        }
    }
    from_order_key(low)
}

/// Benjamini–Hochberg adjusted p-values (q-values), in the order given: comparing each with a
/// level q controls the false discovery rate across all the tests at q.
pub fn benjamini_hochberg(p_values: &[f64]) -> Vec<f64> {
    let m = p_values.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|a, b| p_values[*a].total_cmp(&p_values[*b]));
    let mut adjusted = vec![1.0; m];
    let mut running = 1.0f64;
    for (rank, index) in order.iter().enumerate().rev() {
        let p = if p_values[*index].is_finite() {
            p_values[*index]
        } else {
            1.0
        };
        running = running.min(p * m as f64 / (rank + 1) as f64);
        adjusted[*index] = running.clamp(0.0, 1.0);
    }
    adjusted
}

/// Weighted Benjamini–Hochberg adjusted p-values (Genovese, Roeder & Wasserman 2006), in the
/// order given: each p-value is divided by its weight and the quotients go through
/// [`benjamini_hochberg`]. The weights are rescaled to average 1 (which is what keeps the false
/// discovery rate at the level); a weight above 1 spends more of the level on that test, below 1
/// less. Weights that are not finite or not positive count as 0 (such a test is never
/// discovered); all weights 0, or a length that differs from the p-values', gives the
/// unweighted adjustment.
pub fn weighted_benjamini_hochberg(p_values: &[f64], weights: &[f64]) -> Vec<f64> {
    let clean = |w: f64| if w.is_finite() && w > 0.0 { w } else { 0.0 };
    let total: f64 = weights.iter().map(|w| clean(*w)).sum();
    if weights.len() != p_values.len() || total <= 0.0 {
        return benjamini_hochberg(p_values);
    }
    let m = p_values.len() as f64;
    let quotients: Vec<f64> = p_values
        .iter()
        .zip(weights)
        .map(|(p, w)| {
            let w = clean(*w) * m / total;
            if w > 0.0 && p.is_finite() {
                p / w
            } else {
                f64::INFINITY
            }
        })
        .collect();
    benjamini_hochberg(&quotients)
}

/// Running moments of a series in constant memory: count, sum, sum of squares and the sum of
/// products of consecutive values (for the lag-1 autocorrelation), so a window or a baseline of
/// any length is summarised in ten numbers (the two smallest and two largest values kept for
/// winsorizing).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RunningMoments {
    pub n: u64,
    pub sum: f64,
    pub sum_sq: f64,
    /// Sum of `x[t] * x[t - 1]`.
    pub sum_lag: f64,
    pub first: f64,
    pub last: f64,
    /// The two smallest and the two largest values (`min[0] <= min[1]`, `max[0] >= max[1]`;
    /// with one value, both are that value).
    pub min: [f64; 2],
    pub max: [f64; 2],
}

impl RunningMoments {
    /// Adds a value; values that are not finite are ignored.
    pub fn push(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        if self.n == 0 {
            self.first = x;
            (self.min, self.max) = ([x, x], [x, x]);
        } else {
            self.sum_lag += x * self.last;
            if self.n == 1 {
                let first = self.first;
                self.min = [first.min(x), first.max(x)];
                self.max = [first.max(x), first.min(x)];
            } else {
                if x < self.min[0] {
                    self.min = [x, self.min[0]];
                } else if x < self.min[1] {
                    self.min[1] = x;
                }
                if x > self.max[0] {
                    self.max = [x, self.max[0]];
                } else if x > self.max[1] {
                    self.max[1] = x;
                }
            }
        }
        self.n += 1;
        self.sum += x;
        self.sum_sq += x * x;
        self.last = x;
    }

    #[cfg(test)]
    pub fn of(values: &[f64]) -> RunningMoments {
        let mut m = RunningMoments::default();
        for v in values {
            m.push(*v);
        }
        m
    }

    pub fn mean(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / self.n as f64)
    }

    /// The mean with the largest value replaced by the second largest, and the mean with the
    /// smallest replaced by the second smallest (winsorized once at each end); `None` below two
    /// values.
    pub fn winsorized_means(&self) -> Option<(f64, f64)> {
        if self.n < 2 {
            return None;
        }
        let n = self.n as f64;
        Some((
            (self.sum - self.max[0] + self.max[1]) / n,
            (self.sum - self.min[0] + self.min[1]) / n,
        ))
    }

    /// Sample variance (n - 1 in the denominator); `None` below two values.
    pub fn variance(&self) -> Option<f64> {
        if self.n < 2 {
            return None;
        }
        let n = self.n as f64;
        let mean = self.sum / n;
        Some(((self.sum_sq - n * mean * mean) / (n - 1.0)).max(0.0))
    }

    /// The mean and the sample variance with the single value farthest from the mean replaced
    /// by its neighbour (the largest by the second largest, or the smallest by the second
    /// smallest): one value far out, such as a baseline sample whose calls met a lock wait,
    /// sets neither the level nor the spread of all the others. Replacing the farthest value
    /// takes off part of the variance of a sample without one: on average 1 − 2.5 / n of a
    /// normal sample's variance is kept (simulated: 0.57 at n = 6, 0.68 at 8, 0.88 at 20, 0.98
    /// at 120), so the variance is divided by that and stays the variance where nothing is far
    /// out. Below [`WINSORIZE_FROM`] values the plain mean and variance: in a handful of values
    /// one far from the others may as well be the statement's own spread, and winsorizing it
    /// leaves the variance of the rest, below a quarter of the true one in 29 % of normal
    /// samples of four (14 % plain; simulated), so a short baseline often made an ordinary
    /// window a shift. `None` below two values.
    pub fn winsorized_moments(&self) -> Option<(f64, f64)> {
        if self.n < WINSORIZE_FROM {
            return Some((self.mean()?, self.variance()?));
        }
        let n = self.n as f64;
        let mean = self.sum / n;
        let (out, by) = if self.max[0] - mean >= mean - self.min[0] {
            (self.max[0], self.max[1])
        } else {
            (self.min[0], self.min[1])
        };
        let sum = self.sum - out + by;
        let sum_sq = self.sum_sq - out * out + by * by;
        let mean = sum / n;
        let variance = ((sum_sq - n * mean * mean) / (n - 1.0)).max(0.0);
        Some((mean, variance / (1.0 - 2.5 / n)))
    }

    /// Lag-1 autocorrelation; `None` below three values or without spread.
    pub fn lag1_autocorrelation(&self) -> Option<f64> {
        if self.n < 3 {
            return None;
        }
        let n = self.n as f64;
        let mean = self.sum / n;
        let spread = self.sum_sq - n * mean * mean;
        if spread <= f64::EPSILON * self.sum_sq.abs().max(1.0) {
            return None;
        }
        // Sum over t >= 1 of (x[t] - mean)(x[t-1] - mean).
        let tail = self.sum - self.first;
        let head = self.sum - self.last;
        let covariance = self.sum_lag - mean * (tail + head) + (n - 1.0) * mean * mean;
        Some((covariance / spread).clamp(-1.0, 1.0))
    }
}

/// How many values [`RunningMoments::winsorized_moments`] needs before it winsorizes one,
/// chosen as the fewest at which the winsorized variance (corrected) understates the true one
/// no more often than the plain variance of four values does: below a quarter of it in 12 % of
/// normal samples at six (simulated; plain, four values: 14 %; winsorized, four: 29 %, five:
/// 18 %). Seven means of a statement in an eight-sample baseline, one of which met a lock wait,
/// are winsorized.
pub const WINSORIZE_FROM: u64 = 6;

/// A sequential comparison of a window's mean with the baseline's, valid at every look.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SequentialShift {
    /// Window mean minus baseline mean, the window's most extreme value in the direction of the
    /// change winsorized: with its largest value replaced by the second largest when that mean
    /// is still above the baseline's, with its smallest replaced by the second smallest when
    /// that mean is still below, else 0.
    pub shift: f64,
    /// Variance of that difference: the baseline's per-value variance (at least `min_sd`
    /// squared), inflated for lag-1 autocorrelation as the mean of each side's number of
    /// consecutive values is, the window's side scaled up when its values hold fewer calls
    /// ([`fewer_calls_factor`]).
    pub variance: f64,
    /// Natural log of the mixture likelihood ratio.
    pub log_likelihood_ratio: f64,
    /// Always-valid p-value: `min(1, 1 / likelihood ratio)`. Flagging whenever it falls below
    /// alpha, at any number of looks, keeps the chance of a false flag at most alpha.
    pub p_value: f64,
    /// The autocorrelation used (clamped to [0, 0.9]).
    pub autocorrelation: f64,
}

/// The normal-mixture likelihood ratio of an estimate `estimate` ~ N(θ, `variance`) with
/// θ ~ N(0, `tau`²) against θ = 0, as its natural log, and the always-valid p-value
/// `min(1, 1 / ratio)`. As the estimate is refined look by look (its variance shrinking), the
/// ratio is a martingale under θ = 0, so it passes 1 / alpha at some look with probability at
/// most alpha (Ville's inequality). `None` for a variance or scale that is not positive.
pub fn mixture_test(estimate: f64, variance: f64, tau: f64) -> Option<(f64, f64)> {
    let tau2 = tau * tau;
    if !(variance > 0.0 && variance.is_finite() && tau2 > 0.0 && estimate.is_finite()) {
        return None;
    }
    let log_lr = 0.5 * (variance / (variance + tau2)).ln()
        + tau2 * estimate * estimate / (2.0 * variance * (variance + tau2));
    Some((log_lr, (-log_lr).exp().min(1.0)))
}

/// The one-sided form of [`mixture_test`], for "θ > 0" against "θ ≤ 0": the mixing
/// distribution is the half-normal over θ > 0 (scale `tau`), which gives the two-sided ratio
/// times `2 Φ(estimate · tau / sqrt(variance (variance + tau²)))`. Under any θ ≤ 0 the ratio is
/// a supermartingale, so the p-value `min(1, 1 / ratio)` stays always valid; a test that only
/// ever flags one direction gets about half the two-sided p-value for a clear change in it,
/// and none of the level spent on the other direction. `None` as for [`mixture_test`].
pub fn one_sided_mixture_test(estimate: f64, variance: f64, tau: f64) -> Option<(f64, f64)> {
    let (two_sided, _) = mixture_test(estimate, variance, tau)?;
    let tau2 = tau * tau;
    let z = estimate * tau / (variance * (variance + tau2)).sqrt();
    // 2 Φ(z) = 2 (1 − Φ(−z)) = 2 · P(Z > −z).
    let log_lr = two_sided + (2.0 * normal_sf(-z)).ln();
    Some((log_lr, (-log_lr).exp().min(1.0)))
}

/// How much the variance of the mean of `n` consecutive values of an AR(1) series with lag-1
/// autocorrelation `r` exceeds that of `n` independent ones: `(1 + r) / (1 − r) −
/// 2 r (1 − rⁿ) / (n (1 − r)²)`. 1 for a single value, rising toward the long-run
/// `(1 + r) / (1 − r)` as `n` grows; using the long-run factor for a window of a few samples
/// overstates its variance (by 40 % at six samples and r = 0.6).
pub fn ar1_mean_variance_factor(n: f64, r: f64) -> f64 {
    let r = r.clamp(0.0, MAX_AUTOCORRELATION);
    let n = n.max(1.0);
    ((1.0 + r) / (1.0 - r) - 2.0 * r * (1.0 - r.powf(n)) / (n * (1.0 - r) * (1.0 - r))).max(1.0)
}

/// Highest lag-1 autocorrelation the tests credit to a series: [`sequential_shift`] clamps to
/// it, and [`fewer_calls_factor`] takes it as the most the drifting part of a series can have.
pub const MAX_AUTOCORRELATION: f64 = 0.9;

/// How much noisier than the baseline's a window's per-sample means are when each holds fewer
/// calls: `1 + w (calls_ratio − 1)` for `calls_ratio` (the baseline's calls per mean over the
/// window's) above 1, else 1. `w` is the largest share of the variance that can be white
/// (single calls' spread over the calls averaged, which scales with 1 / calls): for a drifting
/// AR(1) part with autocorrelation φ ≤ [`MAX_AUTOCORRELATION`] plus white noise, the series'
/// lag-1 autocorrelation is `r` = φ · (1 − w), so `w` ≤ 1 − r / `MAX_AUTOCORRELATION`. Taking
/// that bound errs toward a noisier window: a statement whose means hold a quarter of the
/// calls, with `r` 0.45, gets its window variance scaled by 2.5; one with r = 0.9 (all drift)
/// by 1. Not finite: 1.
pub fn fewer_calls_factor(calls_ratio: f64, r: f64) -> f64 {
    if !calls_ratio.is_finite() || calls_ratio <= 1.0 {
        return 1.0;
    }
    let white = (1.0 - r.clamp(0.0, MAX_AUTOCORRELATION) / MAX_AUTOCORRELATION).clamp(0.0, 1.0);
    1.0 + white * (calls_ratio - 1.0)
}

/// Mixture sequential probability ratio test (mSPRT, normal mixture with scale `tau`) of the
/// difference between `window`'s mean and `baseline`'s, for a change carried by more than one
/// window value.
///
/// The window's most extreme value in the direction of the change is winsorized (set to the
/// next one): a slowdown must show with the window's largest value replaced by its second
/// largest, a speedup with its smallest replaced by its second smallest (`shift` is whichever
/// of the two differences keeps its sign, else 0). Per-sample means of few calls are
/// heavy-tailed: one sample whose calls met a descheduled backend or a lock wait is ×10 to ×20
/// on a statement of a few hundredths of a millisecond, and against a baseline of a handful of
/// tight samples it moved the window's mean far beyond what the baseline's spread allows, with
/// p-values of 10⁻⁵ to 10⁻⁹⁰ while the rank test and the Hodges–Lehmann interval said the
/// samples had not moved. A change present in several samples (a slower plan, intermittent
/// waits in a share of the samples) loses little: the gap between its two largest values.
///
/// Under "no change" the difference is about N(0, V) with V = s² (f(n_w) / n_w + f(n_b) /
/// n_b), the baseline's mean and s² its variance with its value farthest from the mean
/// winsorized from [`WINSORIZE_FROM`] values up ([`RunningMoments::winsorized_moments`]: one
/// baseline sample that met a lock wait must neither hide every later slowdown of the statement
/// nor make an unchanged window look faster; s² at least `min_sd` squared), r its lag-1
/// autocorrelation (sampled statistics drift, so consecutive values are correlated) and f the
/// variance factor of the mean of n consecutive AR(1) values ([`ar1_mean_variance_factor`]). The
/// baseline's variance stands for the window's: under "no change" they are the same, and a
/// window's own variance is large exactly when the change is intermittent waits in a share of
/// its samples, which must be found (a Welch variance, s_b² / n_b + s_w² / n_w, would take lock
/// contention in a third of the samples, ×20, from a few samples to about sixty). Winsorizing
/// the extreme value in the direction tested only moves the estimate toward zero, so the
/// p-values stay valid (conservative). The likelihood ratio of N(θ, V) with θ ~ N(0, tau²)
/// against θ = 0 is sqrt(V / (V + tau²)) exp(tau² d² / (2 V (V + tau²))); by Ville's
/// inequality it exceeds 1 / alpha at some look with probability at most alpha, however often
/// the growing window is looked at. `None` without two baseline values and two window values.
///
/// The one way the window is known to be noisier than the baseline under "no change" is fewer
/// calls behind each of its values: a per-sample mean of c calls varies by a part that drifts
/// with the statement (the autocorrelated part) plus the spread of single calls over c (white
/// noise). `calls_ratio` is the baseline's calls per value over the window's; above 1 (traffic
/// fell at the deployment) the white part of the window's variance is scaled by it
/// ([`fewer_calls_factor`]), so a quiet hour's noisier means of a rarely called statement are
/// not a slowdown. Below 1 nothing is taken off: the baseline's variance still stands.
pub fn sequential_shift(
    baseline: &RunningMoments,
    window: &RunningMoments,
    calls_ratio: f64,
    tau: f64,
    min_sd: f64,
) -> Option<SequentialShift> {
    let (mean_b, variance_b) = baseline.winsorized_moments()?;
    let variance_b = variance_b.max(min_sd * min_sd);
    let (lowered, raised) = window.winsorized_means()?;
    let d = if lowered > mean_b {
        lowered - mean_b
    } else if raised < mean_b {
        raised - mean_b
    } else {
        0.0
    };
    let r = baseline
        .lag1_autocorrelation()
        .unwrap_or(0.0)
        .clamp(0.0, MAX_AUTOCORRELATION);
    let (n_w, n_b) = (window.n as f64, baseline.n as f64);
    let fewer_calls = fewer_calls_factor(calls_ratio, r);
    let v = variance_b
        * (ar1_mean_variance_factor(n_w, r) * fewer_calls / n_w
            + ar1_mean_variance_factor(n_b, r) / n_b);
    let (log_lr, p_value) = mixture_test(d, v, tau)?;
    Some(SequentialShift {
        shift: d,
        variance: v,
        log_likelihood_ratio: log_lr,
        p_value,
        autocorrelation: r,
    })
}

/// Inverse of the standard normal distribution function (Acklam's rational approximation,
/// relative error below 1.2e-9).
pub fn normal_quantile(p: f64) -> f64 {
    let p = p.clamp(1e-300, 1.0 - 1e-16);
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let low = 0.024_25;
    if p < low {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - low {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -normal_quantile(1.0 - p)
    }
}

/// Survival function of the standard normal distribution, `P(Z > z)`.
pub fn normal_sf(z: f64) -> f64 {
    0.5 * libm::erfc(z / std::f64::consts::SQRT_2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance
    }

    #[test]
    fn the_winsorized_moments_leave_out_the_one_value_far_out() {
        let tight = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02];
        let mut with_outlier = tight.to_vec();
        with_outlier.push(6.0);
        let plain = RunningMoments::of(&with_outlier);
        let (mean, variance) = plain.winsorized_moments().unwrap_or((f64::NAN, f64::NAN));
        assert!(plain.variance().unwrap_or(0.0) > 2.0);
        assert!(plain.mean().unwrap_or(0.0) > 1.6);
        assert!((mean - 1.015).abs() < 1e-9, "{mean}");
        assert!(variance < 0.01, "{variance}");
        // A low value far out is winsorized the same way.
        let low: Vec<f64> = with_outlier.iter().map(|x| 2.0 - x).collect();
        let (low_mean, low_variance) = RunningMoments::of(&low)
            .winsorized_moments()
            .unwrap_or((f64::NAN, f64::NAN));
        assert!((low_mean - (2.0 - mean)).abs() < 1e-9, "{low_mean}");
        assert!(
            (low_variance - variance).abs() < 1e-12,
            "{low_variance} {variance}"
        );
        // Below six values: the plain moments.
        let three = RunningMoments::of(&[1.0, 2.0, 9.0]);
        assert_eq!(
            three.winsorized_moments(),
            Some((4.0, three.variance().unwrap_or(f64::NAN)))
        );
    }

    /// Four values, one far from the others: in so few, that one may as well be the spread,
    /// and the plain moments stand. Winsorized, the variance was about 0.001 (corrected), where
    /// the plain one is 0.12.
    #[test]
    fn a_short_sample_is_not_winsorized() {
        let four = RunningMoments::of(&[0.0, 0.02, -0.02, 0.7]);
        assert_eq!(
            four.winsorized_moments(),
            Some((0.175, four.variance().unwrap_or(f64::NAN)))
        );
        assert!(
            (four.variance().unwrap_or(f64::NAN) - 0.122_766_7).abs() < 1e-6,
            "{:?}",
            four.variance()
        );
        let five = RunningMoments::of(&[0.0, 0.02, -0.02, 0.01, 0.7]);
        assert_eq!(
            five.winsorized_moments(),
            Some((
                five.mean().unwrap_or(f64::NAN),
                five.variance().unwrap_or(f64::NAN)
            ))
        );
        // From six values the one far out is winsorized.
        let six = RunningMoments::of(&[0.0, 0.02, -0.02, 0.01, -0.01, 0.7]);
        let (mean, variance) = six.winsorized_moments().unwrap_or((f64::NAN, f64::NAN));
        assert!((mean - 0.02 / 6.0).abs() < 1e-12, "{mean}");
        assert!(variance < 0.001, "{variance}");
    }

    /// Without a value far out the winsorized variance is still the variance on average: small
    /// baselines (7 or 8 means end to end) are not judged with less spread than they have.
    #[test]
    fn the_winsorized_variance_is_the_variance_where_nothing_is_far_out() {
        let mut seed = 11u64;
        let mut uniform = move || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((seed >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let mut normal = move || {
            let (u1, u2) = (uniform(), uniform());
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        };
        for n in [6usize, 8, 12, 20, 120] {
            let rounds = 20_000;
            let total: f64 = (0..rounds)
                .map(|_| {
                    let values: Vec<f64> = (0..n).map(|_| normal()).collect();
                    RunningMoments::of(&values)
                        .winsorized_moments()
                        .map_or(f64::NAN, |(_, v)| v)
                })
                .sum();
            let ratio = total / rounds as f64;
            // Plain sample variance: 1 on average. Uncorrected, the winsorized one was 0.68 at
            // n = 8.
            assert!((0.88..1.06).contains(&ratio), "n {n}: {ratio}");
        }
    }

    #[test]
    fn central_values() {
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
        // No overlap: window all larger. Exact (no ties, small): p = 1 / C(10, 5) = 1/252;
        // scipy method="exact": 0.003968, two-sided 0.007937.
        let r =
            mann_whitney(&[1.0, 2.0, 3.0, 4.0, 5.0], &[6.0, 7.0, 8.0, 9.0, 10.0]).expect("test");
        assert_eq!(r.u, 25.0);
        assert!(close(r.p_greater, 1.0 / 252.0, 1e-12), "{r:?}");
        assert!(close(r.p_two_sided, 2.0 / 252.0, 1e-12), "{r:?}");
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

    fn choose(n: u64, k: u64) -> f64 {
        (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
    }

    #[test]
    fn exact_tails_match_known_answers() {
        // Against brute force: every way of choosing which of 9 ranked values are the 4
        // window values, U counted pair by pair.
        let (n1, n2) = (5usize, 4usize);
        let mut counts = vec![0u32; n1 * n2 + 1];
        for mask in 0u32..(1 << (n1 + n2)) {
            if mask.count_ones() as usize != n2 {
                continue;
            }
            let mut u = 0;
            let mut baseline_below = 0;
            for position in 0..(n1 + n2) {
                if mask & (1 << position) != 0 {
                    u += baseline_below;
                } else {
                    baseline_below += 1;
                }
            }
            counts[u] += 1;
        }
        let total: u32 = counts.iter().sum();
        for u in 0..=(n1 * n2) {
            let tail: u32 = counts[u..].iter().sum();
            let expected = f64::from(tail) / f64::from(total);
            assert!(
                close(exact_u_tail(n1, n2, u as f64), expected, 1e-12),
                "U >= {u}"
            );
        }
        // And through the test itself: window [3, 5, 7, 9] vs baseline [1, 2, 4, 6, 8].
        let r = mann_whitney(&[1.0, 2.0, 4.0, 6.0, 8.0], &[3.0, 5.0, 7.0, 9.0]).expect("test");
        assert_eq!(r.u, 14.0);
        assert!(close(r.p_greater, exact_u_tail(5, 4, 14.0), 1e-15), "{r:?}");
        // Whole distribution sums to one; P(U >= 0) = 1; P(U >= max) = 1 / C(n1 + n2, n2).
        for (n1, n2) in [(1, 1), (3, 2), (7, 5), (12, 12), (30, 30)] {
            assert!(close(exact_u_tail(n1, n2, 0.0), 1.0, 1e-12));
            let max = (n1 * n2) as f64;
            let expected = 1.0 / choose((n1 + n2) as u64, n2 as u64);
            assert!(
                (exact_u_tail(n1, n2, max) / expected - 1.0).abs() < 1e-9,
                "{n1} {n2}"
            );
        }
    }

    #[test]
    fn hodges_lehmann_selects_what_sorting_every_difference_gives() {
        let brute = |baseline: &[f64], window: &[f64]| {
            let mut d: Vec<f64> = window
                .iter()
                .flat_map(|w| baseline.iter().map(move |b| w - b))
                .collect();
            d.sort_by(f64::total_cmp);
            d
        };
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((seed >> 11) as f64) / (1u64 << 53) as f64
        };
        for round in 0..40 {
            let n1 = 1 + round % 13;
            let n2 = 1 + (round * 7) % 11;
            // Rounded values, so there are ties and equal differences.
            let baseline: Vec<f64> = (0..n1).map(|_| (next() * 20.0).round() - 5.0).collect();
            let window: Vec<f64> = (0..n2).map(|_| (next() * 30.0).round() / 4.0).collect();
            let d = brute(&baseline, &window);
            let hl = hodges_lehmann(&baseline, &window, 0.95).expect("hl");
            assert_eq!(
                hl.shift,
                median(&d).expect("median"),
                "{baseline:?} {window:?}"
            );
            let (b, w) = (sorted(&baseline), sorted(&window));
            for (k, expected) in d.iter().enumerate() {
                assert_eq!(kth_difference(&b, &w, k), *expected, "k {k} of {d:?}");
            }
            assert!(d.contains(&hl.low) && d.contains(&hl.high));
        }
        // Negative, fractional and large values alike.
        let baseline = [-3.25, 1e6, 0.001, -0.0, 42.0];
        let window = [0.0, -1e-9, 7.5, 1e6 + 0.5];
        let d = brute(&baseline, &window);
        let (b, w) = (sorted(&baseline), sorted(&window));
        for (k, expected) in d.iter().enumerate() {
            assert_eq!(kth_difference(&b, &w, k), *expected, "k {k}");
        }
    }

    #[test]
    fn small_samples_get_the_exact_interval() {
        // 5 against 5: P(U <= 2) = 4/252 = 0.016 and P(U <= 3) = 7/252 = 0.028, so the exact
        // 95 % interval runs from the 3rd to the 23rd of the 25 differences (coverage 96.8 %);
        // the normal approximation's (4th to 22nd) covers only 94.4 %.
        assert_eq!(interval_rank(5, 5, 0.95), 2);
        let baseline = [0.0, 10.0, 20.0, 30.0, 40.0];
        let window = [1.0, 12.0, 23.0, 34.0, 45.0];
        let mut d: Vec<f64> = window
            .iter()
            .flat_map(|w| baseline.iter().map(move |b| w - b))
            .collect();
        d.sort_by(f64::total_cmp);
        let hl = hodges_lehmann(&baseline, &window, 0.95).expect("hl");
        assert_eq!((hl.low, hl.high), (d[2], d[22]), "{d:?}");
        // Too few values for any exact bound at that level: the whole range.
        assert_eq!(interval_rank(2, 2, 0.95), 0);
        // Above EXACT_MAX_N the normal approximation, which is close there.
        assert_eq!(interval_rank(40, 40, 0.95), 596);
        assert!(interval_rank(30, 30, 0.95).abs_diff(317) <= 2);
    }

    #[test]
    fn hodges_lehmann_shift_and_interval() {
        let baseline: Vec<f64> = (0..20).map(|i| 10.0 + f64::from(i % 5)).collect();
        let window: Vec<f64> = baseline.iter().map(|v| v + 3.0).collect();
        let hl = hodges_lehmann(&baseline, &window, 0.95).expect("hl");
        assert_eq!(hl.shift, 3.0);
        assert!(hl.low <= 3.0 && 3.0 <= hl.high, "{hl:?}");
        assert!(hl.high - hl.low < 4.0, "{hl:?}");
        assert!(hodges_lehmann(&[], &[1.0], 0.95).is_none());
    }

    #[test]
    fn benjamini_hochberg_known_answers() {
        // R: p.adjust(c(0.01, 0.04, 0.03, 0.005), "BH") = 0.02 0.04 0.04 0.02
        let q = benjamini_hochberg(&[0.01, 0.04, 0.03, 0.005]);
        let expected = [0.02, 0.04, 0.04, 0.02];
        for (a, b) in q.iter().zip(expected) {
            assert!(close(*a, b, 1e-12), "{q:?}");
        }
        assert!(benjamini_hochberg(&[]).is_empty());
        assert_eq!(benjamini_hochberg(&[f64::NAN]), vec![1.0]);
    }

    #[test]
    fn weighted_benjamini_hochberg_known_answers() {
        // Equal weights are the unweighted adjustment, whatever their scale.
        let p = [0.01, 0.04, 0.03, 0.2];
        assert_eq!(
            weighted_benjamini_hochberg(&p, &[3.0; 4]),
            benjamini_hochberg(&p)
        );
        // Weights 2, 1, 1, 0 (average 1): p / w = 0.005, 0.04, 0.03, inf; sorted 0.005, 0.03,
        // 0.04, inf give 0.02, 0.06, 0.0533, 1 -> monotone 0.02, 0.0533, 0.0533, 1.
        let q = weighted_benjamini_hochberg(&p, &[2.0, 1.0, 1.0, 0.0]);
        assert!(close(q[0], 0.02, 1e-12), "{q:?}");
        assert!(close(q[1], 0.16 / 3.0, 1e-12), "{q:?}");
        assert!(close(q[2], 0.16 / 3.0, 1e-12), "{q:?}");
        assert_eq!(q[3], 1.0);
        // A weight of 20 among 200 tests: a p-value of 5e-4 is a discovery at 0.01 (it is not
        // without the weight, which asks for 5e-5).
        let mut p = vec![0.5; 200];
        p[0] = 5e-4;
        let mut w = vec![1.0; 200];
        w[0] = 20.0;
        assert!(benjamini_hochberg(&p)[0] > 0.01);
        assert!(weighted_benjamini_hochberg(&p, &w)[0] <= 0.01);
        // Mismatched or empty weights fall back to the unweighted adjustment.
        assert_eq!(weighted_benjamini_hochberg(&p, &[]), benjamini_hochberg(&p));
        assert_eq!(
            weighted_benjamini_hochberg(&p, &vec![0.0; 200]),
            benjamini_hochberg(&p)
        );
    }

    #[test]
    fn normal_quantile_inverts_the_tail() {
        for p in [0.001, 0.025, 0.3, 0.5, 0.9, 0.975, 0.999] {
            assert!(close(normal_sf(-normal_quantile(p)), p, 1e-6), "{p}");
        }
    }

    /// AR(1) noise: x[t] = phi x[t-1] + e[t], e ~ N(0, sd²) by Box–Muller.
    struct Ar1 {
        state: u64,
        x: f64,
        phi: f64,
        sd: f64,
    }

    impl Ar1 {
        fn uniform(&mut self) -> f64 {
            self.state = self
                .state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((self.state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }

        fn next(&mut self) -> f64 {
            let (u1, u2) = (self.uniform(), self.uniform());
            let e = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            self.x = self.phi * self.x + self.sd * e;
            self.x
        }
    }

    #[test]
    fn running_moments_match_the_direct_formulas() {
        let values = [1.0, 3.0, 2.0, 5.0, 4.0, 4.5, 0.5];
        let m = RunningMoments::of(&values);
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let lag: f64 = values
            .windows(2)
            .map(|w| (w[1] - mean) * (w[0] - mean))
            .sum::<f64>()
            / values.iter().map(|v| (v - mean).powi(2)).sum::<f64>();
        assert!(close(m.mean().expect("mean"), mean, 1e-12));
        assert!(close(m.variance().expect("variance"), variance, 1e-12));
        assert!(close(m.lag1_autocorrelation().expect("r"), lag, 1e-12));
        assert_eq!(RunningMoments::default().mean(), None);
        assert_eq!(RunningMoments::of(&[1.0]).variance(), None);
        assert_eq!(
            RunningMoments::of(&[2.0, 2.0, 2.0]).lag1_autocorrelation(),
            None
        );
        // A strongly autocorrelated series is recognised as such.
        let mut ar = Ar1 {
            state: 3,
            x: 0.0,
            phi: 0.8,
            sd: 1.0,
        };
        let series: Vec<f64> = (0..5000).map(|_| ar.next()).collect();
        let r = RunningMoments::of(&series)
            .lag1_autocorrelation()
            .expect("r");
        assert!((r - 0.8).abs() < 0.05, "{r}");
    }

    #[test]
    fn the_mixture_ratio_is_known_in_closed_form() {
        // estimate 2, variance 1, tau 1: ratio sqrt(1/2) exp(4 / 4) = 1.9221.
        let (log_lr, p) = mixture_test(2.0, 1.0, 1.0).expect("test");
        assert!(close(log_lr, 0.5 * 0.5f64.ln() + 1.0, 1e-12));
        assert!(close(p, 1.0 / (0.5f64.sqrt() * 1f64.exp()), 1e-12));
        // No evidence: the ratio is below one, p is 1.
        assert_eq!(mixture_test(0.0, 1.0, 1.0).map(|r| r.1), Some(1.0));
        assert!(mixture_test(1.0, 0.0, 1.0).is_none());
        assert!(mixture_test(1.0, 1.0, 0.0).is_none());
        assert!(mixture_test(f64::NAN, 1.0, 1.0).is_none());
    }

    #[test]
    fn the_sequential_test_knows_a_shift_from_noise() {
        let baseline = RunningMoments::of(&[0.0, 0.1, -0.1, 0.05, -0.05, 0.0, 0.1, -0.1]);
        let same = RunningMoments::of(&[0.02, -0.03, 0.04, -0.01, 0.0]);
        let doubled = RunningMoments::of(&[0.7, 0.68, 0.72, 0.69, 0.71]);
        let quiet = sequential_shift(&baseline, &same, 1.0, 0.3, 0.02).expect("test");
        assert!(quiet.p_value > 0.5, "{quiet:?}");
        let loud = sequential_shift(&baseline, &doubled, 1.0, 0.3, 0.02).expect("test");
        assert!(loud.p_value < 1e-6 && loud.shift > 0.6, "{loud:?}");
        assert!(sequential_shift(&RunningMoments::of(&[1.0]), &same, 1.0, 0.3, 0.02).is_none());
        assert!(sequential_shift(&baseline, &RunningMoments::default(), 1.0, 0.3, 0.02).is_none());
        // A constant baseline does not make every wiggle significant: the floor on the spread.
        let flat = RunningMoments::of(&[1.0; 30]);
        let wiggle = RunningMoments::of(&[1.01, 0.99, 1.02, 1.0]);
        let r = sequential_shift(&flat, &wiggle, 1.0, 0.3, 0.05).expect("test");
        assert!(r.p_value > 0.5, "{r:?}");
    }

    /// The point of an always-valid p-value: looking at a growing window after every sample
    /// (here 200 looks), the chance that any look falls below alpha stays near alpha, even with
    /// autocorrelated noise; a fixed-sample test looked at so often would flag most windows.
    #[test]
    fn the_sequential_p_value_stays_valid_over_many_looks() {
        let (runs, looks, alpha) = (400, 200, 0.05);
        let (mut sequential_false, mut naive_false) = (0, 0);
        for run in 0..runs {
            let mut ar = Ar1 {
                state: 1000 + run,
                x: 0.0,
                phi: 0.5,
                sd: 0.2,
            };
            for _ in 0..50 {
                ar.next();
            }
            let baseline = RunningMoments::of(&(0..120).map(|_| ar.next()).collect::<Vec<_>>());
            let mut window = RunningMoments::default();
            let (mut seq_hit, mut naive_hit) = (false, false);
            for _ in 0..looks {
                window.push(ar.next());
                let Some(r) = sequential_shift(&baseline, &window, 1.0, 0.3, 0.01) else {
                    continue;
                };
                // The one-sided test of a slowdown, as `query_latency` uses it.
                let slower = one_sided_mixture_test(r.shift, r.variance, 0.3).map_or(1.0, |t| t.1);
                seq_hit |= r.shift > 0.0 && slower < alpha;
                // The same difference judged as if this were the only look.
                let z = r.shift / r.variance.sqrt();
                naive_hit |= normal_sf(z) < alpha;
            }
            sequential_false += usize::from(seq_hit);
            naive_false += usize::from(naive_hit);
        }
        let rate = sequential_false as f64 / runs as f64;
        assert!(rate <= 0.06, "always-valid: {rate}");
        assert!(
            naive_false > 2 * sequential_false,
            "{naive_false} vs {sequential_false}"
        );
        // And real shifts are found within a few looks despite the ±23 % autocorrelated noise:
        // 2x within 10, 1.5x within 20.
        for (factor, within) in [(2.0f64, 10), (1.5, 20)] {
            let mut ar = Ar1 {
                state: 77,
                x: 0.0,
                phi: 0.5,
                sd: 0.2,
            };
            let baseline = RunningMoments::of(&(0..120).map(|_| ar.next()).collect::<Vec<_>>());
            let mut window = RunningMoments::default();
            let mut found_at = None;
            for look in 1..=60 {
                window.push(ar.next() + factor.ln());
                let Some(r) = sequential_shift(&baseline, &window, 1.0, 0.3, 0.01) else {
                    continue;
                };
                let slower = one_sided_mixture_test(r.shift, r.variance, 0.3).map_or(1.0, |t| t.1);
                if slower < alpha {
                    found_at = Some(look);
                    break;
                }
            }
            assert!(
                found_at.is_some_and(|n| n <= within),
                "{factor}: {found_at:?}"
            );
        }
    }

    /// The one-sided mixture spends no level on the other direction: for a clear change in its
    /// direction about half the two-sided p-value, for a change the other way nothing.
    #[test]
    fn the_one_sided_mixture_gives_about_half_the_p_value_in_its_direction() {
        let (_, two) = mixture_test(0.3, 0.01, 0.3).expect("test");
        let (_, one) = one_sided_mixture_test(0.3, 0.01, 0.3).expect("test");
        assert!(
            one < two && (one / two - 0.5).abs() < 0.01,
            "{one} vs {two}"
        );
        let (_, against) = one_sided_mixture_test(-0.3, 0.01, 0.3).expect("test");
        assert_eq!(against, 1.0);
        assert!(one_sided_mixture_test(0.3, 0.0, 0.3).is_none());
    }

    #[test]
    fn the_mean_of_few_autocorrelated_values_varies_less_than_the_long_run_factor_says() {
        assert!((ar1_mean_variance_factor(1.0, 0.6) - 1.0).abs() < 1e-12);
        assert!((ar1_mean_variance_factor(10.0, 0.0) - 1.0).abs() < 1e-12);
        // Six values at r = 0.6: 4 − 1.2 (1 − 0.6⁶) / 0.96 = 2.80832, against the long-run 4.
        let six = ar1_mean_variance_factor(6.0, 0.6);
        assert!((six - 2.80832).abs() < 1e-4, "{six}");
        let long = ar1_mean_variance_factor(10_000.0, 0.6);
        assert!((long - 4.0).abs() < 0.001, "{long}");
        // The clamp of the tests: no more than r = 0.9, none below 0.
        assert_eq!(
            ar1_mean_variance_factor(1e9, 0.99),
            ar1_mean_variance_factor(1e9, 0.9)
        );
        assert!((ar1_mean_variance_factor(6.0, -0.5) - 1.0).abs() < 1e-12);
    }

    /// Fewer calls a mean make the window's means noisier by at most their white share.
    #[test]
    fn fewer_calls_a_mean_scale_only_the_white_part_of_the_variance() {
        // All white (r = 0): a quarter of the calls, four times the variance.
        assert!((fewer_calls_factor(4.0, 0.0) - 4.0).abs() < 1e-12);
        // r = 0.45 at most half drift: 1 + 0.5 · 3.
        assert!((fewer_calls_factor(4.0, 0.45) - 2.5).abs() < 1e-12);
        // All drift: the calls change nothing.
        assert!((fewer_calls_factor(4.0, 0.9) - 1.0).abs() < 1e-12);
        // More calls a mean take nothing off, and nonsense changes nothing.
        assert_eq!(fewer_calls_factor(0.5, 0.0), 1.0);
        assert_eq!(fewer_calls_factor(f64::NAN, 0.0), 1.0);
        assert_eq!(fewer_calls_factor(f64::INFINITY, 0.0), 1.0);
        // And the sequential test's variance follows it.
        let values: Vec<f64> = (0..60)
            .map(|i| 0.1 * ((i * 7 % 11) as f64 - 5.0) / 5.0)
            .collect();
        let baseline = RunningMoments::of(&values);
        let window = RunningMoments::of(&values[..12]);
        let same = sequential_shift(&baseline, &window, 1.0, 0.3, 0.01).expect("test");
        let quiet = sequential_shift(&baseline, &window, 4.0, 0.3, 0.01).expect("test");
        assert!(
            quiet.variance > 2.0 * same.variance,
            "{quiet:?} vs {same:?}"
        );
    }

    /// One window sample 15x slower (a descheduled backend, one lock wait among few calls) on a
    /// tight baseline is not a shift: the rank test and the Hodges–Lehmann interval say the
    /// samples did not move, and neither may the sequential test. A steady shift still is.
    #[test]
    fn one_heavy_window_sample_is_not_a_shift() {
        let baseline = RunningMoments::of(&[0.0, 0.02, -0.02, 0.01, -0.01, 0.03, -0.03, 0.0]);
        let mut values = vec![0.01, -0.01, 0.02, 0.0, -0.02];
        values.push(15f64.ln());
        let heavy = RunningMoments::of(&values);
        let r = sequential_shift(&baseline, &heavy, 1.0, 0.3, 0.05).expect("test");
        assert!(r.p_value > 0.5, "{r:?}");
        // The same, the heavy sample first, among more samples.
        let mut values = vec![15f64.ln()];
        values.extend([0.01, -0.01, 0.02, 0.0, -0.02, 0.01, 0.0, -0.01, 0.02]);
        let r = sequential_shift(&baseline, &RunningMoments::of(&values), 1.0, 0.3, 0.05)
            .expect("test");
        assert!(r.p_value > 0.5, "{r:?}");
        // A steady 1.5x over the window is found at once.
        let steady: Vec<f64> = [0.01, -0.01, 0.02, 0.0, -0.02, 0.01]
            .iter()
            .map(|e| 1.5f64.ln() + e)
            .collect();
        let r = sequential_shift(&baseline, &RunningMoments::of(&steady), 1.0, 0.3, 0.05)
            .expect("test");
        assert!(
            r.p_value < 1e-6 && (r.shift - 1.5f64.ln()).abs() < 0.05,
            "{r:?}"
        );
        // So is a heavy share of samples (intermittent waits in a third of them).
        let mut waits = vec![0.01, -0.01, 0.02, 0.0, -0.02, 0.01, 0.0, -0.01, 0.02];
        waits.extend([20f64.ln(); 4]);
        let r =
            sequential_shift(&baseline, &RunningMoments::of(&waits), 1.0, 0.3, 0.05).expect("test");
        assert!(r.p_value < 1e-6, "{r:?}");
        // And faster the same way: one fast sample is not an improvement.
        let mut values = vec![0.01, -0.01, 0.02, 0.0, -0.02];
        values.push(-(15f64.ln()));
        let r = sequential_shift(&baseline, &RunningMoments::of(&values), 1.0, 0.3, 0.05)
            .expect("test");
        assert!(r.p_value > 0.5, "{r:?}");
    }

    /// On the workload's noise (AR(1), phi 0.6, about ±15 %), a slowdown passes the level a
    /// lone discovery among 200 queries needs (0.01 / 200), with the window's largest value
    /// winsorized: 2x within 10 samples in most runs and within 14 in all, 1.5x within 20 in
    /// most and within 60 (the end of a first day of 20 + 40 samples) in all.
    #[test]
    fn real_shifts_are_found_within_a_few_samples() {
        for (factor, typical, slowest) in [(2.0f64, 10, 14), (1.5, 20, 60)] {
            let mut found: Vec<usize> = (0..20)
                .map(|seed| {
                    let mut ar = Ar1 {
                        state: 500 + seed,
                        x: 0.0,
                        phi: 0.6,
                        sd: 0.12,
                    };
                    let baseline =
                        RunningMoments::of(&(0..120).map(|_| ar.next()).collect::<Vec<_>>());
                    let mut window = RunningMoments::default();
                    (1..=100)
                        .find(|_| {
                            window.push(ar.next() + factor.ln());
                            // One-sided, as `query_latency` tests a slowdown.
                            sequential_shift(&baseline, &window, 1.0, 0.3, 0.05).is_some_and(|r| {
                                one_sided_mixture_test(r.shift, r.variance, 0.3)
                                    .is_some_and(|(_, p)| p < 0.01 / 200.0)
                            })
                        })
                        .unwrap_or(usize::MAX)
                })
                .collect();
            found.sort_unstable();
            assert!(
                found[10] <= typical && found[19] <= slowest,
                "{factor}: {found:?}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn p_values_are_probabilities(
            baseline in proptest::collection::vec(0.0f64..100.0, 1..40),
            window in proptest::collection::vec(0.0f64..100.0, 1..40),
        ) {
            let r = mann_whitney(&baseline, &window).expect("non-empty");
            proptest::prop_assert!((0.0..=1.0).contains(&r.p_greater));
            proptest::prop_assert!((0.0..=1.0).contains(&r.p_two_sided));
            let hl = hodges_lehmann(&baseline, &window, 0.95).expect("non-empty");
            proptest::prop_assert!(hl.low <= hl.shift && hl.shift <= hl.high);
        }

        #[test]
        fn q_values_are_at_least_p_values(p in proptest::collection::vec(0.0f64..=1.0, 0..50)) {
            let q = benjamini_hochberg(&p);
            for (a, b) in p.iter().zip(&q) {
                proptest::prop_assert!(*b >= a - 1e-12 && *b <= 1.0);
            }
        }
    }
}
