//! What the node counts while it runs, for `/metrics` and the dashboard.
//!
//! The counters and histograms are process-wide statics made of atomics, as
//! etcd's are package-level: a hook on the hot path is one relaxed
//! `fetch_add` (a histogram: a short scan of its bounds and two), with no
//! lock, no allocation and nothing to pass through constructors. `kvserver`
//! runs one node per process, so they are that node's; tests that start
//! several nodes in one process see their sums. What belongs to one node
//! (role, term, indexes, follower progress) is not kept here: `http/` reads
//! it from the node's status when scraped.
//!
//! The exposition (names, types, `_bucket/_sum/_count`) is written by the
//! `prometheus-client` crate: [`ProcessCollector`] hands it the values.
//! [`warnings`] logs the slow-disk and overload warnings, rate-limited.

pub mod warnings;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::proto::kvstore::ErrorCode;

/// A monotonic counter.
pub struct Counter(AtomicU64);

impl Counter {
    pub const fn new() -> Counter {
        Counter(AtomicU64::new(0))
    }

    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Default for Counter {
    fn default() -> Self {
        Counter::new()
    }
}

/// A value that goes up and down.
pub struct Gauge(AtomicI64);

impl Gauge {
    pub const fn new() -> Gauge {
        Gauge(AtomicI64::new(0))
    }

    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Default for Gauge {
    fn default() -> Self {
        Gauge::new()
    }
}

/// How many finite buckets a histogram may have.
const MAX_BUCKETS: usize = 32;

/// A histogram of integer observations (nanoseconds, or a count of
/// entries) over fixed upper bounds, in atomics. The exposed value is the
/// integer divided by `per_unit` (1e9 for seconds from nanoseconds).
pub struct Histogram {
    /// Inclusive upper bounds, ascending, in the integer unit.
    bounds: &'static [u64],
    per_unit: f64,
    /// Observations per bucket (not cumulative); the one after the last
    /// bound counts those above every bound (+Inf).
    buckets: [AtomicU64; MAX_BUCKETS + 1],
    sum: AtomicU64,
}

/// A histogram's values at one moment: cumulative counts per bound.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in the exposed unit, observations <= bound)`, the last
    /// one `f64::INFINITY` (so its count is the total).
    pub cumulative: Vec<(f64, u64)>,
    pub sum: f64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.cumulative.last().map_or(0, |&(_, c)| c)
    }

    /// The `q` quantile (0..1) of what was observed between `earlier` and
    /// this snapshot, as the upper bound of the bucket it falls in (what
    /// Prometheus' `histogram_quantile` would interpolate within); `None`
    /// when nothing was observed.
    pub fn quantile_since(&self, earlier: Option<&HistogramSnapshot>, q: f64) -> Option<f64> {
        let delta = |i: usize| {
            let before = earlier.and_then(|e| e.cumulative.get(i)).map_or(0, |p| p.1);
            self.cumulative[i].1.saturating_sub(before)
        };
        let total = delta(self.cumulative.len().checked_sub(1)?);
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let i = (0..self.cumulative.len()).find(|&i| delta(i) >= rank)?;
        let bound = self.cumulative[i].0;
        // Above the last bound: say the last bound, not infinity.
        Some(if bound.is_finite() || i == 0 {
            bound
        } else {
            self.cumulative[i - 1].0
        })
    }
}

impl Histogram {
    pub const fn new(bounds: &'static [u64], per_unit: f64) -> Histogram {
        assert!(bounds.len() <= MAX_BUCKETS);
        Histogram {
            bounds,
            per_unit,
            buckets: [const { AtomicU64::new(0) }; MAX_BUCKETS + 1],
            sum: AtomicU64::new(0),
        }
    }

    /// Records one observation of `value` (in the integer unit).
    pub fn observe(&self, value: u64) {
        let i = self
            .bounds
            .iter()
            .position(|&bound| value <= bound)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, elapsed: Duration) {
        self.observe(elapsed.as_nanos().min(u64::MAX as u128) as u64);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = Vec::with_capacity(self.bounds.len() + 1);
        let mut total = 0;
        for (i, &bound) in self.bounds.iter().enumerate() {
            total += self.buckets[i].load(Ordering::Relaxed);
            cumulative.push((bound as f64 / self.per_unit, total));
        }
        total += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        cumulative.push((f64::INFINITY, total));
        HistogramSnapshot {
            cumulative,
            sum: self.sum.load(Ordering::Relaxed) as f64 / self.per_unit,
        }
    }
}

const NS: f64 = 1e9;
const US: u64 = 1_000;
const MS: u64 = 1_000_000;
const S: u64 = 1_000_000_000;

/// Request and round latencies: fine below a millisecond, where this store
/// answers, and up to the request timeout.
static LATENCY_BOUNDS_NS: [u64; 25] = [
    50 * US,
    100 * US,
    200 * US,
    300 * US,
    500 * US,
    750 * US,
    MS,
    3 * MS / 2,
    2 * MS,
    3 * MS,
    5 * MS,
    15 * MS / 2,
    10 * MS,
    15 * MS,
    20 * MS,
    30 * MS,
    50 * MS,
    75 * MS,
    100 * MS,
    200 * MS,
    500 * MS,
    S,
    2 * S,
    5 * S,
    10 * S,
];
/// Disk and snapshot durations: fsync is ~0.1 ms on a good disk, seconds on
/// a failing one.
static DISK_BOUNDS_NS: [u64; 20] = [
    25 * US,
    50 * US,
    100 * US,
    200 * US,
    500 * US,
    MS,
    2 * MS,
    4 * MS,
    8 * MS,
    16 * MS,
    32 * MS,
    64 * MS,
    128 * MS,
    256 * MS,
    512 * MS,
    S,
    2 * S,
    4 * S,
    8 * S,
    16 * S,
];
/// Entries per AppendEntries: one under light load, hundreds batched.
static BATCH_BOUNDS: [u64; 12] = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

/// The client operations, in the order of [`CLIENT_REQUEST_DURATION`].
pub const OPS: [&str; 6] = ["get", "put", "append", "delete", "cas", "status"];
/// Why a request failed, in the order of the `*_FAILED` arrays.
pub const FAILURE_REASONS: [&str; 4] = ["not_leader", "busy", "timeout", "other"];

pub static PROPOSALS_RECEIVED: Counter = Counter::new();
pub static PROPOSALS_COMMITTED: Counter = Counter::new();
pub static PROPOSALS_FAILED: [Counter; 4] = [const { Counter::new() }; 4];
pub static READS_FAILED: [Counter; 4] = [const { Counter::new() }; 4];
pub static CLIENT_REQUEST_DURATION: [Histogram; 6] =
    [const { Histogram::new(&LATENCY_BOUNDS_NS, NS) }; 6];
pub static WAL_FSYNC_DURATION: Histogram = Histogram::new(&DISK_BOUNDS_NS, NS);
pub static WAL_WRITTEN_BYTES: Counter = Counter::new();
pub static APPEND_ENTRIES_BATCH: Histogram = Histogram::new(&BATCH_BOUNDS, 1.0);
pub static READ_INDEX_DURATION: Histogram = Histogram::new(&LATENCY_BOUNDS_NS, NS);
pub static APPLY_DURATION: Histogram = Histogram::new(&DISK_BOUNDS_NS, NS);
pub static SNAPSHOTS_TAKEN: Counter = Counter::new();
pub static SNAPSHOT_TAKEN_BYTES: Counter = Counter::new();
pub static SNAPSHOT_SAVE_DURATION: Histogram = Histogram::new(&DISK_BOUNDS_NS, NS);
pub static SNAPSHOTS_SENT: Counter = Counter::new();
pub static SNAPSHOT_SENT_BYTES: Counter = Counter::new();
pub static SNAPSHOT_SEND_DURATION: Histogram = Histogram::new(&DISK_BOUNDS_NS, NS);
pub static SNAPSHOTS_RECEIVED: Counter = Counter::new();
pub static SNAPSHOT_RECEIVED_BYTES: Counter = Counter::new();
pub static SNAPSHOT_INSTALL_DURATION: Histogram = Histogram::new(&DISK_BOUNDS_NS, NS);
pub static LEADER_CHANGES: Counter = Counter::new();
pub static ELECTIONS_STARTED: Counter = Counter::new();
pub static CONNECTIONS_REFUSED: Counter = Counter::new();
/// Connections the RPC server serves now (peers and clerks).
pub static CONNECTIONS_OPEN: Gauge = Gauge::new();

/// Counts a client request that failed with `code`: a write (proposal) or
/// a read. Codes other than the three named reasons count as `other`.
pub fn request_failed(write: bool, code: ErrorCode) {
    let reason = match code {
        ErrorCode::NOT_LEADER => 0,
        ErrorCode::BUSY => 1,
        ErrorCode::TIMEOUT => 2,
        _ => 3,
    };
    let counters = if write {
        &PROPOSALS_FAILED
    } else {
        &READS_FAILED
    };
    counters[reason].inc();
}

/// Called after every WAL fsync.
pub fn fsync_done(node: u64, elapsed: Duration) {
    WAL_FSYNC_DURATION.observe_duration(elapsed);
    warnings::fsync_took(node, elapsed);
}

/// Called after every batch of `entries` committed entries is applied.
pub fn apply_done(node: u64, entries: usize, elapsed: Duration) {
    APPLY_DURATION.observe_duration(elapsed);
    warnings::apply_took(node, entries, elapsed);
}

/// The histogram of one client operation by its RPC method name, if it is one.
pub fn client_request_histogram(method: &str) -> Option<&'static Histogram> {
    OPS.iter()
        .position(|op| op.eq_ignore_ascii_case(method))
        .map(|i| &CLIENT_REQUEST_DURATION[i])
}

/// Hands every process-wide counter and histogram to the exposition.
#[derive(Debug, Default)]
pub struct ProcessCollector;

pub fn encode_counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let counter = ConstCounter::new(value);
    let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
    counter.encode(metric)
}

pub fn encode_gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(value);
    let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
    gauge.encode(metric)
}

pub fn encode_labelled_counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, count) in values {
        let labels = [(label, *value)];
        let metric = family.encode_family(&labels)?;
        ConstCounter::new(*count).encode(metric)?;
    }
    Ok(())
}

fn encode_histogram_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: Option<&str>,
    histograms: &[(&str, &Histogram)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (value, histogram) in histograms {
        let snapshot = histogram.snapshot();
        let mut buckets = Vec::with_capacity(snapshot.cumulative.len());
        let mut below = 0;
        for &(bound, cumulative) in &snapshot.cumulative {
            buckets.push((bound, cumulative - below));
            below = cumulative;
        }
        let count = snapshot.count();
        match label {
            Some(label) => {
                let labels = [(label, *value)];
                family
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(snapshot.sum, count, &buckets, None)?;
            }
            None => {
                family.encode_histogram::<NoLabelSet>(snapshot.sum, count, &buckets, None)?;
            }
        }
    }
    Ok(())
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        let by_reason = |counters: &'static [Counter; 4]| -> Vec<(&'static str, u64)> {
            FAILURE_REASONS
                .iter()
                .zip(counters)
                .map(|(reason, c)| (*reason, c.get()))
                .collect()
        };
        encode_counter(
            e,
            "kvstore_proposals_received",
            "Write requests (put, append, delete, cas) received from clients.",
            PROPOSALS_RECEIVED.get(),
        )?;
        encode_counter(
            e,
            "kvstore_proposals_committed",
            "Log entries this node learned are committed (client writes and the leaders' no-ops).",
            PROPOSALS_COMMITTED.get(),
        )?;
        encode_labelled_counters(
            e,
            "kvstore_proposals_failed",
            "Write requests answered with an error, by reason.",
            "reason",
            &by_reason(&PROPOSALS_FAILED),
        )?;
        encode_labelled_counters(
            e,
            "kvstore_reads_failed",
            "Read requests answered with an error, by reason.",
            "reason",
            &by_reason(&READS_FAILED),
        )?;
        let ops: Vec<(&str, &Histogram)> = OPS
            .iter()
            .zip(&CLIENT_REQUEST_DURATION)
            .map(|(op, h)| (*op, h))
            .collect();
        encode_histogram_family(
            e,
            "kvstore_client_request_duration_seconds",
            "Client requests by operation: time from the request's arrival to its answer.",
            Some("op"),
            &ops,
        )?;
        let single = [
            (
                "kvstore_wal_fsync_duration_seconds",
                "Time of each fdatasync of the write-ahead log.",
                &WAL_FSYNC_DURATION,
            ),
            (
                "kvstore_append_entries_batch_entries",
                "Entries carried by each AppendEntries sent to a follower.",
                &APPEND_ENTRIES_BATCH,
            ),
            (
                "kvstore_read_index_duration_seconds",
                "ReadIndex rounds: from a batch of reads reaching the leader's core to the quorum's confirmation.",
                &READ_INDEX_DURATION,
            ),
            (
                "kvstore_apply_duration_seconds",
                "Time to apply one batch of committed entries to the state machine.",
                &APPLY_DURATION,
            ),
            (
                "kvstore_snapshot_save_duration_seconds",
                "Time to store a snapshot this node took of its state machine.",
                &SNAPSHOT_SAVE_DURATION,
            ),
            (
                "kvstore_snapshot_send_duration_seconds",
                "Time to stream a snapshot to a follower, first chunk to last.",
                &SNAPSHOT_SEND_DURATION,
            ),
            (
                "kvstore_snapshot_install_duration_seconds",
                "Time to store a snapshot received from the leader.",
                &SNAPSHOT_INSTALL_DURATION,
            ),
        ];
        for (name, help, histogram) in single {
            encode_histogram_family(e, name, help, None, &[("", histogram)])?;
        }
        let counters = [
            (
                "kvstore_wal_written_bytes",
                "Bytes written to the write-ahead log.",
                &WAL_WRITTEN_BYTES,
            ),
            (
                "kvstore_snapshots_taken",
                "Snapshots of the state machine this node took and stored.",
                &SNAPSHOTS_TAKEN,
            ),
            (
                "kvstore_snapshot_taken_bytes",
                "Bytes of the snapshots this node took.",
                &SNAPSHOT_TAKEN_BYTES,
            ),
            (
                "kvstore_snapshots_sent",
                "Snapshots sent whole to a follower (InstallSnapshot, last chunk sent).",
                &SNAPSHOTS_SENT,
            ),
            (
                "kvstore_snapshot_sent_bytes",
                "Bytes of InstallSnapshot chunks sent.",
                &SNAPSHOT_SENT_BYTES,
            ),
            (
                "kvstore_snapshots_received",
                "Snapshots received from the leader and installed.",
                &SNAPSHOTS_RECEIVED,
            ),
            (
                "kvstore_snapshot_received_bytes",
                "Bytes of the snapshots received from the leader.",
                &SNAPSHOT_RECEIVED_BYTES,
            ),
            (
                "kvstore_leader_changes",
                "Times this node saw a new leader.",
                &LEADER_CHANGES,
            ),
            (
                "kvstore_elections_started",
                "Elections this node started as a candidate (after winning a pre-vote).",
                &ELECTIONS_STARTED,
            ),
            (
                "kvstore_connections_refused",
                "Connections to the RPC port closed at once because all max_connections were in use.",
                &CONNECTIONS_REFUSED,
            ),
        ];
        for (name, help, counter) in counters {
            encode_counter(e, name, help, counter.get())?;
        }
        encode_gauge(
            e,
            "kvstore_connections_open",
            "Connections the RPC port serves now (peers and clerks).",
            CONNECTIONS_OPEN.get(),
        )?;
        encode_labelled_counters(
            e,
            "kvstore_slow_events",
            "Slow-disk and overload events (each also a rate-limited warning in the log), by kind.",
            "kind",
            &warnings::counts(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static BOUNDS: [u64; 3] = [10, 20, 40];

    #[test]
    fn histogram_counts_cumulatively_and_finds_quantiles() {
        let h = Histogram::new(&BOUNDS, 1.0);
        for v in [1, 10, 11, 20, 39, 1000] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(
            s.cumulative,
            vec![(10.0, 2), (20.0, 4), (40.0, 5), (f64::INFINITY, 6)]
        );
        assert_eq!(s.sum, 1081.0);
        assert_eq!(s.quantile_since(None, 0.5), Some(20.0));
        // Above every bound: the last bound, not infinity.
        assert_eq!(s.quantile_since(None, 0.99), Some(40.0));
        let earlier = s.clone();
        h.observe(5);
        let later = h.snapshot();
        assert_eq!(later.quantile_since(Some(&earlier), 0.99), Some(10.0));
        assert_eq!(earlier.quantile_since(Some(&earlier), 0.99), None);
    }
}
