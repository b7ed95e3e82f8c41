//! The dashboard's memory: one sample per second of the rates and
//! percentiles it charts, for the last [`MAX_SAMPLES`] seconds, computed
//! from the differences between successive readings of the process-wide
//! counters (so a chart costs the hot path nothing).

use std::collections::VecDeque;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::metrics::{self, HistogramSnapshot};

/// Seconds of history kept (and charted).
pub const MAX_SAMPLES: usize = 300;

/// The counters at one moment.
struct Reading {
    at: Instant,
    committed: u64,
    reads: u64,
    busy: u64,
    leader_changes: u64,
    elections: u64,
    latency: HistogramSnapshot,
    fsync: HistogramSnapshot,
}

impl Reading {
    fn now() -> Reading {
        // Every client operation but `status` (which is not load).
        let mut latency: Option<HistogramSnapshot> = None;
        for (op, histogram) in metrics::OPS.iter().zip(&metrics::CLIENT_REQUEST_DURATION) {
            if *op == "status" {
                continue;
            }
            let snapshot = histogram.snapshot();
            latency = Some(match latency {
                None => snapshot,
                Some(mut sum) => {
                    for (total, (_, count)) in sum.cumulative.iter_mut().zip(&snapshot.cumulative) {
                        total.1 += count;
                    }
                    sum.sum += snapshot.sum;
                    sum
                }
            });
        }
        let busy = metrics::PROPOSALS_FAILED[1].get() + metrics::READS_FAILED[1].get();
        Reading {
            at: Instant::now(),
            committed: metrics::PROPOSALS_COMMITTED.get(),
            reads: metrics::CLIENT_REQUEST_DURATION[0].snapshot().count(),
            busy,
            leader_changes: metrics::LEADER_CHANGES.get(),
            elections: metrics::ELECTIONS_STARTED.get(),
            latency: latency.unwrap_or_default(),
            fsync: metrics::WAL_FSYNC_DURATION.snapshot(),
        }
    }
}

/// One second of the charts.
#[derive(Clone, Debug)]
struct Sample {
    unix_ms: u64,
    writes_per_sec: f64,
    reads_per_sec: f64,
    p99_ms: Option<f64>,
    fsync_p99_ms: Option<f64>,
    busy_per_sec: f64,
    leader_changes: u64,
    elections: u64,
}

pub struct History {
    last: Option<Reading>,
    samples: VecDeque<Sample>,
}

impl History {
    pub fn new() -> History {
        History {
            last: None,
            samples: VecDeque::with_capacity(MAX_SAMPLES),
        }
    }

    /// Reads the counters and adds the sample since the last reading.
    pub fn sample(&mut self) {
        let now = Reading::now();
        if let Some(last) = &self.last {
            let seconds = (now.at - last.at).as_secs_f64().max(1e-3);
            let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / seconds;
            let ms = |seconds: f64| seconds * 1e3;
            let sample = Sample {
                unix_ms: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                writes_per_sec: rate(now.committed, last.committed),
                reads_per_sec: rate(now.reads, last.reads),
                p99_ms: now
                    .latency
                    .quantile_since(Some(&last.latency), 0.99)
                    .map(ms),
                fsync_p99_ms: now.fsync.quantile_since(Some(&last.fsync), 0.99).map(ms),
                busy_per_sec: rate(now.busy, last.busy),
                leader_changes: now.leader_changes.saturating_sub(last.leader_changes),
                elections: now.elections.saturating_sub(last.elections),
            };
            if self.samples.len() == MAX_SAMPLES {
                self.samples.pop_front();
            }
            self.samples.push_back(sample);
        }
        self.last = Some(now);
    }

    /// The series, column by column, oldest first.
    pub fn to_json(&self) -> Value {
        let column =
            |f: &dyn Fn(&Sample) -> Value| -> Vec<Value> { self.samples.iter().map(f).collect() };
        let round = |x: f64| (x * 1000.0).round() / 1000.0;
        json!({
            "interval_ms": 1000,
            "unix_ms": column(&|s| s.unix_ms.into()),
            "writes_per_sec": column(&|s| round(s.writes_per_sec).into()),
            "reads_per_sec": column(&|s| round(s.reads_per_sec).into()),
            "p99_ms": column(&|s| s.p99_ms.map(round).into()),
            "fsync_p99_ms": column(&|s| s.fsync_p99_ms.map(round).into()),
            "busy_per_sec": column(&|s| round(s.busy_per_sec).into()),
            "leader_changes": column(&|s| s.leader_changes.into()),
            "elections": column(&|s| s.elections.into()),
        })
    }
}
