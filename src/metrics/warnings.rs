//! Slow-disk and overload warnings, in the spirit of etcd's "slow
//! fdatasync" and "apply request took too long": each kind is counted
//! (`kvstore_slow_events_total{kind}`) every time, and logged at most once
//! per [`WARNING_INTERVAL_MS`], with how many more happened since the last
//! line, so a disk that stays slow cannot flood the log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// One warning line per kind at most this often.
pub const WARNING_INTERVAL_MS: u64 = 10_000;
/// An fsync slower than this is warned about.
pub const SLOW_FSYNC: Duration = Duration::from_secs(1);
/// Applying one batch of committed entries slower than this is warned about.
pub const SLOW_APPLY: Duration = Duration::from_millis(100);

/// The kinds, in the order of the counters.
const KINDS: [&str; 4] = [
    "slow_fsync",
    "slow_apply",
    "slow_read_index",
    "follower_lagging",
];

struct Limiter {
    events: AtomicU64,
    /// Milliseconds since [`epoch`] of the last line logged, plus one (0: never).
    last_logged_ms: AtomicU64,
    /// Events not logged since the last line.
    suppressed: AtomicU64,
}

impl Limiter {
    const fn new() -> Limiter {
        Limiter {
            events: AtomicU64::new(0),
            last_logged_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Counts one event; returns how many were suppressed before it when
    /// this one should be logged.
    fn admit(&self) -> Option<u64> {
        self.admit_at(epoch().elapsed().as_millis() as u64 + 1)
    }

    fn admit_at(&self, now_ms: u64) -> Option<u64> {
        self.events.fetch_add(1, Ordering::Relaxed);
        let last = self.last_logged_ms.load(Ordering::Relaxed);
        if last != 0 && now_ms < last + WARNING_INTERVAL_MS {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        // Two threads may race here; only the one that moves the mark logs.
        self.last_logged_ms
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .ok()?;
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

static LIMITERS: [Limiter; 4] = [const { Limiter::new() }; 4];
/// The election timeout, past which a ReadIndex round is slow (0: not set).
static READ_INDEX_SLOW_MS: AtomicU64 = AtomicU64::new(0);
/// The snapshot threshold, past which a follower's lag is warned of (0: not set).
static SNAPSHOT_THRESHOLD_BYTES: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn more(suppressed: u64) -> String {
    if suppressed == 0 {
        String::new()
    } else {
        format!(" ({suppressed} more since the last warning)")
    }
}

/// How many events of each kind happened.
pub fn counts() -> Vec<(&'static str, u64)> {
    KINDS
        .iter()
        .zip(&LIMITERS)
        .map(|(kind, limiter)| (*kind, limiter.events.load(Ordering::Relaxed)))
        .collect()
}

/// Sets the bounds from the cluster config: a ReadIndex round is slow past
/// the election timeout, a follower lags past the snapshot threshold.
pub fn set_thresholds(election_timeout_ms: u64, snapshot_threshold_bytes: u64) {
    READ_INDEX_SLOW_MS.store(election_timeout_ms, Ordering::Relaxed);
    SNAPSHOT_THRESHOLD_BYTES.store(snapshot_threshold_bytes, Ordering::Relaxed);
}

pub fn snapshot_threshold_bytes() -> u64 {
    SNAPSHOT_THRESHOLD_BYTES.load(Ordering::Relaxed)
}

/// Called after every WAL fsync.
pub fn fsync_took(node: u64, elapsed: Duration) {
    if elapsed <= SLOW_FSYNC {
        return;
    }
    if let Some(suppressed) = LIMITERS[0].admit() {
        log::warn!(
            "node {node}: slow fdatasync of the WAL: took {:.3} s (over {} s): the disk is slow or failing{}",
            elapsed.as_secs_f64(),
            SLOW_FSYNC.as_secs(),
            more(suppressed)
        );
    }
}

/// Called after every batch of committed entries is applied.
pub fn apply_took(node: u64, entries: usize, elapsed: Duration) {
    if elapsed <= SLOW_APPLY {
        return;
    }
    if let Some(suppressed) = LIMITERS[1].admit() {
        log::warn!(
            "node {node}: applying {entries} entries took {} ms (over {} ms){}",
            elapsed.as_millis(),
            SLOW_APPLY.as_millis(),
            more(suppressed)
        );
    }
}

/// Called when a ReadIndex round completes.
pub fn read_index_took(node: u64, elapsed: Duration) {
    let bound_ms = READ_INDEX_SLOW_MS.load(Ordering::Relaxed);
    if bound_ms == 0 || elapsed <= Duration::from_millis(bound_ms) {
        return;
    }
    if let Some(suppressed) = LIMITERS[2].admit() {
        log::warn!(
            "node {node}: a ReadIndex round took {} ms (over the election timeout, {bound_ms} ms): \
             followers or the network are slow{}",
            elapsed.as_millis(),
            more(suppressed)
        );
    }
}

/// Called by the leader for a follower whose log is behind by about
/// `lag_bytes` (more than the snapshot threshold): it will need a snapshot
/// rather than entries.
pub fn follower_lagging(
    node: u64,
    follower: u64,
    lag_entries: u64,
    lag_bytes: u64,
    threshold_bytes: u64,
) {
    if let Some(suppressed) = LIMITERS[3].admit() {
        log::warn!(
            "node {node}: follower {follower} is {lag_entries} entries (~{lag_bytes} bytes) behind, \
             more than the snapshot threshold ({threshold_bytes} bytes){}",
            more(suppressed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_the_rest_counted() {
        let limiter = Limiter::new();
        assert_eq!(limiter.admit_at(5), Some(0));
        assert_eq!(limiter.admit_at(6), None);
        assert_eq!(limiter.admit_at(5 + WARNING_INTERVAL_MS - 1), None);
        assert_eq!(limiter.admit_at(5 + WARNING_INTERVAL_MS), Some(2));
        assert_eq!(limiter.admit_at(6 + WARNING_INTERVAL_MS), None);
        assert_eq!(limiter.events.load(Ordering::Relaxed), 5);
    }
}
