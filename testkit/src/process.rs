//! What the benchmarks and the cluster read of a process from `/proc` (Linux): its CPU time,
//! its parent, its resident memory.

/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ` on Linux).
const TICKS: f64 = 100.0;

/// A process' CPU time and parent, from `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    /// User and system CPU seconds of the process itself.
    pub cpu: f64,
    /// User and system CPU seconds of the children it has already reaped.
    pub reaped_cpu: f64,
    pub parent: u32,
}

/// `/proc/<pid>/stat` of a process, or `None` when there is no such process (any more).
pub fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (in parentheses) may hold spaces: the fields start after it.
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    let seconds = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Some(Stat {
        cpu: (seconds(11) + seconds(12)) / TICKS,
        reaped_cpu: (seconds(13) + seconds(14)) / TICKS,
        parent: fields.get(1)?.parse().ok()?,
    })
}

/// Resident memory of a process in KiB (0 when unknown).
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A size field (`VmRSS:`, `VmHWM:`, …) of `/proc/<pid>/status` in KiB (0 when unknown).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The machine's CPU time (all cores, every process) and its number of cores, from /proc/stat.
pub fn machine_cpu() -> (f64, usize) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let busy = stat
        .lines()
        .next()
        .map(|l| {
            let f: Vec<f64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal: all but idle and iowait.
            f.iter().take(8).sum::<f64>() - f.get(3).unwrap_or(&0.0) - f.get(4).unwrap_or(&0.0)
        })
        .unwrap_or(0.0);
    let cores = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    (busy / TICKS, cores.max(1))
}

/// Every process running now.
pub fn all() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}
