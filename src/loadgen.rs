//! The load generator behind `loadgen`: N logical clients against a
//! cluster, closed loop (one request in flight each) or open loop (`rate`:
//! requests are scheduled at fixed times whatever the latency, handed to
//! whichever of the N clients is free, and latency counts from the scheduled
//! time, so a slow cluster cannot hide its queueing — no coordinated
//! omission). It reports throughput, HDR-histogram latency percentiles,
//! errors by kind, and the requests the LockQueue pushed back (BUSY) that the
//! clients retried. With `check`, every operation on a sample of keys is
//! recorded and the history goes through the linearizability checker at the
//! end.
//!
//! The generator shares the machine's cores with the cluster it measures, so
//! it must cost little: the clients are not threads but state machines in
//! one event loop ([`mux`]), multiplexed over a few connections per node,
//! each with the clerk's session and retry rules. Latencies are batched and
//! merged into the shared histograms once a second, for the progress lines.

mod mux;
mod plot;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::Mutex;

use crate::check::{self, Operation, Verdict};
use crate::clerk::{ClerkError, ClerkOptions};
use crate::config::ClusterConfig;
use crate::raft::SplitMix64;
use crate::rpc::Credentials;

/// The longest run `run` accepts (warmup plus measured time): one timeline
/// slot is kept per second.
pub const MAX_RUN_SECS: u64 = 24 * 3600;
/// With `check`, at most this many keys are recorded; larger key spaces are
/// sampled evenly (every key `k` with `k % stride == 0`). Whole keys are
/// sampled, never single operations, because a history with some of a key's
/// operations left out can look non-linearizable when it is not.
pub const MAX_CHECKED_KEYS: u64 = 1000;
/// How long the linearizability check may search before it answers "timeout".
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);
/// Progress lines are printed this long after their second ends, so that
/// the event loop has merged that second's latencies (it does when an
/// operation finishes in a later second, or at its next wake-up). Counts are
/// exact whatever the delay.
const PROGRESS_DELAY: Duration = Duration::from_millis(100);
/// The most logical clients sharing one connection: with their calls and
/// the calls they abandoned after an attempt timeout, a connection stays
/// below the server's window of calls in flight per connection (1024), so
/// the server never stops reading it.
pub const MAX_CLIENTS_PER_CONNECTION: usize = 256;

/// The cluster and how to reach it.
#[derive(Clone, Debug)]
pub struct Targets {
    /// Node ids and addresses; never empty.
    pub nodes: Vec<(u64, SocketAddr)>,
    /// Presented in the handshake of every connection (a clerk's: the
    /// cluster id, node id 0).
    pub credentials: Credentials,
    pub client_token: Option<String>,
    pub max_frame_bytes: usize,
    /// Deadline of one operation, retries included: past it the operation
    /// counts as a "timeout" error, with an unknown outcome.
    pub op_timeout: Duration,
    /// Limit on one attempt (connect, or send to reply) to one node, as
    /// [`ClerkOptions::attempt_timeout_ms`].
    pub attempt_timeout_ms: u64,
}

impl Targets {
    /// Every node of `config`, with the clerk's attempt limit.
    pub fn from_config(config: &ClusterConfig, op_timeout: Duration) -> Targets {
        Targets {
            nodes: config
                .raft_nodes
                .iter()
                .map(|node| (node.id, node.addr()))
                .collect(),
            credentials: Credentials::clerk(&config.cluster_id),
            client_token: config.client_token.clone(),
            max_frame_bytes: config.max_frame_bytes,
            op_timeout,
            attempt_timeout_ms: crate::clerk::attempt_timeout_ms(
                config,
                ClerkOptions::default().attempt_timeout_ms,
            ),
        }
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Concurrent logical clients, each its own session with one request in
    /// flight. In an open loop they are the pool that sends the scheduled
    /// requests.
    pub clients: usize,
    /// Connections to each node that the clients share (client `i` uses
    /// connection `i % conns_per_node`). More are opened when the clients
    /// would exceed [`MAX_CLIENTS_PER_CONNECTION`] on one.
    pub conns_per_node: usize,
    pub duration: Duration,
    /// Unmeasured time at the start.
    pub warmup: Duration,
    pub value_size_bytes: usize,
    /// Fill each value past its unique prefix with random letters and
    /// digits instead of one repeated byte. Repeated bytes shrink ~28× under
    /// the snapshot stream's LZ4, so they understate what a transfer of
    /// real data costs; random letters do not shrink at all under LZ4 (it
    /// finds repeats, it does not code entropy).
    pub random_values: bool,
    pub keys: u64,
    /// The fraction of operations that are (linearizable) gets.
    pub read_ratio: f64,
    /// Open loop at this many operations per second in total.
    pub rate: Option<f64>,
    /// Write every key once, unmeasured, before the run (so gets find values).
    pub preload: bool,
    /// Logical clients of the preload (its operations in flight), each its
    /// own session writing its own stripe of keys; more than `clients`, so
    /// that a bulk load keeps the cluster's pipeline full.
    pub preload_clients: usize,
    /// The preload stops starting writes after this long and counts as
    /// failed (with the keys it wrote).
    pub preload_timeout: Duration,
    /// Only preload: no measured run after it.
    pub preload_only: bool,
    /// Record the history (on a sample of keys) and check it.
    pub check: bool,
    /// The most operations recorded for `check`; past it the check is
    /// skipped (and says so) rather than run on a partial history.
    pub max_checked_ops: usize,
    pub seed: u64,
}

/// One second of the run, for progress lines and the plot. `ops`, `busy` and
/// `errors` count everything that finished in that second; `p50_ms` and
/// `p99_ms` cover the measured operations that finished in it.
#[derive(Clone, Debug, Default)]
pub struct SecondStats {
    /// 1 for the first second of the measured window; warmup seconds count
    /// up to 0 (…, -1, 0).
    pub second: i64,
    pub ops: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// p99 of every measured operation up to now (progress lines only).
    pub p99_so_far_ms: f64,
    pub busy: u64,
    pub errors: u64,
}

impl SecondStats {
    /// Whether this second is part of the unmeasured warmup.
    pub fn is_warmup(&self) -> bool {
        self.second <= 0
    }
}

/// What a run measured. Only successful operations that started inside the
/// measured window count in `ops` and the latency figures.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub ops: u64,
    pub reads: u64,
    pub writes: u64,
    pub elapsed_s: f64,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// Failed operations by kind ("timeout", "rejected").
    pub errors: BTreeMap<String, u64>,
    /// The first error message of each kind, to say what went wrong.
    pub error_samples: BTreeMap<String, String>,
    /// Requests answered BUSY by the LockQueue and retried by the clients.
    pub busy: u64,
    /// Open loop: requests scheduled inside the measured window.
    pub scheduled: Option<u64>,
    /// Open loop: scheduled requests never sent because every client was
    /// still busy when the run ended (the backlog of an overloaded cluster).
    pub unsent: u64,
    /// Keys written by the preload, its failed writes and its seconds.
    pub preload_keys: u64,
    pub preload_errors: u64,
    pub preload_s: f64,
    /// Why the preload did not write every key (then no run followed).
    pub preload_error: Option<String>,
    /// The measured gets' and puts' latencies apart (a mix's slowest write
    /// hides behind its reads in the combined figures).
    pub read_latency: LatencySummary,
    pub write_latency: LatencySummary,
    /// CPU seconds (user + system) the generator itself spent on the run.
    pub client_cpu_s: f64,
    /// Connections to each node the clients shared.
    pub conns_per_node: usize,
    pub seconds: Vec<SecondStats>,
    /// "linearizable", "not linearizable: ...", "timeout" or "skipped: ...",
    /// with `check`.
    pub check: Option<String>,
    pub checked_ops: usize,
    pub checked_keys: u64,
    /// The longest time inside the measured window with no write
    /// acknowledged (from the window's start, between two acknowledgements,
    /// or from the last one to the window's end), in ms; 0 when the run
    /// sends no writes.
    /// A leader change shows here as the clients' blackout.
    pub max_write_gap_ms: f64,
    /// When that gap ended, in seconds since the measured window began.
    pub max_write_gap_end_s: f64,
    /// The `WRITE_GAPS_KEPT` longest such gaps, longest first: (ms, when
    /// each ended in seconds since the window began), to tell which event
    /// (a leadership transfer, a stall) caused which.
    pub write_gaps: Vec<(f64, f64)>,
    /// When the measured window began, in seconds since the Unix epoch, to
    /// line the gaps up with events outside the generator.
    pub window_start_unix_s: f64,
}

/// How many of the longest write gaps a report lists.
const WRITE_GAPS_KEPT: usize = 16;

/// Percentiles of one kind of operation, in ms (all 0 when none ran).
#[derive(Clone, Copy, Debug, Default)]
pub struct LatencySummary {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl LatencySummary {
    fn of(histogram: &Histogram<u64>) -> LatencySummary {
        if histogram.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            p50_ms: ms(histogram.value_at_quantile(0.5)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p999_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
        }
    }

    fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "p50_ms": self.p50_ms, "p99_ms": self.p99_ms,
            "p999_ms": self.p999_ms, "max_ms": self.max_ms,
        })
    }
}

/// Where a preload stands, for its progress line.
#[derive(Clone, Copy, Debug)]
pub struct PreloadProgress {
    pub keys: u64,
    pub written: u64,
    pub failed: u64,
    pub elapsed: Duration,
    /// Keys written in the last second.
    pub last_second: u64,
}

impl PreloadProgress {
    /// Keys per second since the preload began.
    pub fn average_per_sec(&self) -> f64 {
        self.written as f64 / self.elapsed.as_secs_f64().max(1e-3)
    }

    /// The time left at the average rate so far, once something was written.
    pub fn eta(&self) -> Option<Duration> {
        let rate = self.average_per_sec();
        (self.written > 0 && rate > 0.0)
            .then(|| Duration::from_secs_f64(self.keys.saturating_sub(self.written) as f64 / rate))
    }
}

/// One second of the timeline, shared by the clients.
struct Slot {
    ops: AtomicU64,
    errors: AtomicU64,
    busy: AtomicU64,
    /// Latencies of the measured operations that finished in this second;
    /// allocated on first use.
    latency: Mutex<Option<Histogram<u64>>>,
}

/// State shared by the clients and the progress printer.
struct Shared<'a> {
    options: &'a LoadOptions,
    /// When the clients start (open-loop slot 0 is scheduled here).
    start: Instant,
    /// Timeline slot `i` covers `[base + i s, base + (i + 1) s)`; `base` is
    /// `start` moved back so that a slot boundary falls on `measure_from`.
    base: Instant,
    warmup_slots: usize,
    measure_from: Instant,
    end: Instant,
    slots: Vec<Slot>,
    /// Every measured success: the run's figures, and "p99 so far".
    measured: Mutex<Histogram<u64>>,
    measured_reads: Mutex<Histogram<u64>>,
    measured_writes: Mutex<Histogram<u64>>,
    /// Keys the preload wrote, and its failed writes (read by its progress
    /// line while it runs).
    preload_written: AtomicU64,
    preload_failed: AtomicU64,
    recorded_ops: AtomicU64,
    history_overflow: AtomicBool,
    /// Time zero of the recorded history: the start of the preload, if
    /// any, else `start`.
    history_origin: Instant,
}

/// Microseconds from 1 µs to 1000 s, 3 significant digits (as etcd-bench).
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 1_000_000_000, 3).expect("valid histogram bounds")
}

/// The per-second histograms only feed the plot: 2 digits are plenty and
/// take a tenth of the memory.
fn new_slot_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 1_000_000_000, 2).expect("valid histogram bounds")
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Shared<'_> {
    fn slot_index(&self, at: Instant) -> usize {
        let index = at.saturating_duration_since(self.base).as_secs() as usize;
        index.min(self.slots.len() - 1)
    }

    /// When open-loop request number `request` is scheduled.
    fn scheduled_at(&self, rate: f64, request: u64) -> Instant {
        self.start + Duration::from_secs_f64(request as f64 / rate)
    }

    /// Requests an open loop schedules in the measured window.
    fn scheduled_in_window(&self) -> Option<u64> {
        let rate = self.options.rate?;
        let first = (self.measure_from - self.start).as_secs_f64() * rate;
        let past_end = (self.end - self.start).as_secs_f64() * rate;
        Some((past_end.ceil() - first.ceil()).max(0.0) as u64)
    }
}

/// One operation that has ended, as the engine reports it to the [`Tally`].
struct Finished {
    /// When the operation was due: latency counts from here.
    scheduled: Instant,
    finished: Instant,
    is_read: bool,
    /// BUSY answers retried on the way.
    busy: u64,
    result: Result<(), ClerkError>,
}

/// What the clients measured, kept by the engine (one thread, no locks)
/// and merged into the report at the end.
#[derive(Default)]
struct Tally {
    /// Latencies (µs) of measured successes, and whether each was a read,
    /// not yet merged into the shared histograms, all finished in timeline
    /// slot `pending_slot`.
    pending: Vec<(u64, bool)>,
    pending_slot: usize,
    reads: u64,
    writes: u64,
    busy: u64,
    /// Operations scheduled inside the measured window that were sent.
    sent_measured: u64,
    errors: BTreeMap<&'static str, u64>,
    error_samples: BTreeMap<&'static str, String>,
    history: Vec<Operation>,
    last_finish: Option<Instant>,
    /// The latest write acknowledged inside the measured window, and the
    /// longest gap between two such acknowledgements with when it ended.
    last_write_ack: Option<Instant>,
    /// The longest gaps so far, longest first (at most `WRITE_GAPS_KEPT`).
    write_gaps: Vec<(Duration, Instant)>,
}

impl Tally {
    /// Counts one ended operation of the run in its second and, when it
    /// started inside the measured window, in the run's figures.
    fn finish(&mut self, shared: &Shared, op: Finished) {
        let measured = op.scheduled >= shared.measure_from;
        let slot_index = shared.slot_index(op.finished);
        if slot_index != self.pending_slot {
            self.flush(shared);
            self.pending_slot = slot_index;
        }
        let slot = &shared.slots[slot_index];
        if op.busy > 0 {
            slot.busy.fetch_add(op.busy, Ordering::Relaxed);
        }
        if measured {
            self.sent_measured += 1;
            self.busy += op.busy;
        }
        match op.result {
            Ok(()) => {
                slot.ops.fetch_add(1, Ordering::Relaxed);
                if !op.is_read {
                    self.write_acked(shared, op.finished);
                }
                if measured {
                    let latency_us = op.finished.duration_since(op.scheduled).as_micros() as u64;
                    self.pending.push((latency_us.max(1), op.is_read));
                    if op.is_read {
                        self.reads += 1;
                    } else {
                        self.writes += 1;
                    }
                    self.last_finish = Some(op.finished);
                }
            }
            Err(error) => {
                slot.errors.fetch_add(1, Ordering::Relaxed);
                if measured {
                    self.count_error(&error);
                }
            }
        }
    }

    /// Any write acknowledged in the measured window (whenever it was sent)
    /// ends a gap that began at the previous one, or at the window's start.
    fn write_acked(&mut self, shared: &Shared, at: Instant) {
        if at < shared.measure_from {
            return;
        }
        let since = self.last_write_ack.unwrap_or(shared.measure_from);
        if at > since {
            self.note_write_gap(at - since, at);
            self.last_write_ack = Some(at);
        }
    }

    fn note_write_gap(&mut self, gap: Duration, ended: Instant) {
        let gaps = &mut self.write_gaps;
        if gaps.len() == WRITE_GAPS_KEPT && gaps.last().is_some_and(|&(g, _)| g >= gap) {
            return;
        }
        let at = gaps.partition_point(|&(g, _)| g >= gap);
        gaps.insert(at, (gap, ended));
        gaps.truncate(WRITE_GAPS_KEPT);
    }

    fn count_error(&mut self, error: &ClerkError) {
        let kind = match error {
            ClerkError::Timeout { .. } => "timeout",
            ClerkError::Rejected(_) => "rejected",
            ClerkError::Unknown { .. } => "unknown",
        };
        *self.errors.entry(kind).or_default() += 1;
        self.error_samples
            .entry(kind)
            .or_insert_with(|| error.to_string());
    }

    /// Keeps one operation of the history, unless the history is full.
    fn record(&mut self, shared: &Shared, operation: Operation) {
        if shared.recorded_ops.fetch_add(1, Ordering::Relaxed)
            >= shared.options.max_checked_ops as u64
        {
            shared.history_overflow.store(true, Ordering::Relaxed);
            return;
        }
        self.history.push(operation);
    }

    /// Merges the pending latencies once their second is over, so that the
    /// progress line of that second sees them.
    fn flush_if_past(&mut self, shared: &Shared, now: Instant) {
        if !self.pending.is_empty() && shared.slot_index(now) != self.pending_slot {
            self.flush(shared);
        }
    }

    /// Merges the pending latencies into their second's histogram and into
    /// the run's histogram.
    fn flush(&mut self, shared: &Shared) {
        if self.pending.is_empty() {
            return;
        }
        {
            let mut slot = shared.slots[self.pending_slot].latency.lock();
            let histogram = slot.get_or_insert_with(new_slot_histogram);
            for &(us, _) in &self.pending {
                histogram.saturating_record(us);
            }
        }
        let mut measured = shared.measured.lock();
        let mut reads = shared.measured_reads.lock();
        let mut writes = shared.measured_writes.lock();
        for &(us, is_read) in &self.pending {
            measured.saturating_record(us);
            if is_read {
                reads.saturating_record(us);
            } else {
                writes.saturating_record(us);
            }
        }
        self.pending.clear();
    }
}

/// Every `check_stride`-th key is recorded for the check.
fn check_stride(keys: u64) -> u64 {
    keys.div_ceil(MAX_CHECKED_KEYS).max(1)
}

/// User plus system CPU time of this process so far.
fn process_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// How often the preload's progress printer checks whether it is over.
const PRELOAD_POLL: Duration = Duration::from_millis(100);

/// Runs the load against `targets` and reports. With `preload`, every key is
/// first written once by `preload_clients` clients of their own (their
/// progress goes to `preload_progress` once a second); when that fails, the
/// report says why and no measured run follows. `progress` is called once a
/// second of the measured run with that second's figures.
pub fn run(
    options: &LoadOptions,
    targets: &Targets,
    progress: &(dyn Fn(&SecondStats) + Sync),
    preload_progress: &(dyn Fn(&PreloadProgress) + Sync),
) -> Report {
    assert!(options.clients > 0, "at least one client");
    assert!(!targets.nodes.is_empty(), "at least one node");
    assert!(
        (options.warmup + options.duration).as_secs() <= MAX_RUN_SECS,
        "a run of at most {MAX_RUN_SECS} s"
    );
    assert!(
        options.preload_timeout.as_secs() <= MAX_RUN_SECS,
        "a preload of at most {MAX_RUN_SECS} s"
    );
    let cpu_before = process_cpu();
    let run_nonce = SplitMix64::new(options.seed ^ clock_seed()).next_u64();
    let mut report = Report::default();
    let mut preloaded = None;
    if options.preload || options.preload_only {
        let preload = preload(options, targets, run_nonce, preload_progress);
        report.preload_keys = preload.written;
        report.preload_errors = preload.failed;
        report.preload_s = preload.elapsed.as_secs_f64();
        report.preload_error = preload.error.clone();
        if report.preload_error.is_some() || options.preload_only {
            report.client_cpu_s = (process_cpu() - cpu_before).as_secs_f64();
            return report;
        }
        preloaded = Some(preload);
    }
    let mut engine = mux::Engine::new(options, targets, run_nonce);
    report.conns_per_node = engine.conns_per_node();
    let mut io = match mux::Io::connect(targets, engine.conn_count()) {
        Ok(io) => io,
        Err(error) => return connector_failed(report, &error),
    };
    let mut shared = new_shared(options, Instant::now());
    let mut preload_history = Vec::new();
    if let Some(preload) = preloaded {
        // The run's clock starts now; the history (and its time zero) goes on.
        shared
            .recorded_ops
            .store(preload.recorded_ops, Ordering::Relaxed);
        shared
            .history_overflow
            .store(preload.history_overflow, Ordering::Relaxed);
        shared.history_origin = preload.history_origin;
        preload_history = preload.history;
    }
    let phase = match options.rate {
        Some(rate) => mux::Phase::OpenLoop { rate },
        None => mux::Phase::ClosedLoop,
    };
    std::thread::scope(|scope| {
        let printer = scope.spawn(|| report_progress(&shared, progress));
        mux::run_phase(&mut engine, &mut io, &shared, phase);
        printer.join().expect("progress thread");
    });
    drop(io);
    report.client_cpu_s = (process_cpu() - cpu_before).as_secs_f64();
    let mut tally = engine.into_tally();
    preload_history.append(&mut tally.history);
    tally.history = preload_history;
    summarize(&shared, tally, report)
}

/// A report that says the connector thread could not start.
fn connector_failed(mut report: Report, error: &std::io::Error) -> Report {
    let sample = format!("cannot start the connector thread: {error}");
    report.errors.insert("connect".to_string(), 1);
    report.error_samples.insert("connect".to_string(), sample);
    report
}

/// What the preload did, and what the run carries on from it.
struct Preloaded {
    written: u64,
    failed: u64,
    elapsed: Duration,
    error: Option<String>,
    /// With `check`: the preload's recorded writes.
    history: Vec<Operation>,
    recorded_ops: u64,
    history_overflow: bool,
    history_origin: Instant,
}

/// Writes every key once with `preload_clients` clients (connections
/// opened for them alone, so the measured run keeps its own), stopping at
/// the first write that fails for good or at `preload_timeout`.
fn preload(
    options: &LoadOptions,
    targets: &Targets,
    run_nonce: u64,
    progress: &(dyn Fn(&PreloadProgress) + Sync),
) -> Preloaded {
    let clients = options.preload_clients.clamp(
        1,
        usize::try_from(options.keys).unwrap_or(usize::MAX).max(1),
    );
    let preload_options = LoadOptions {
        clients,
        // The phase ends (no new key starts) at the time limit.
        duration: options.preload_timeout,
        warmup: Duration::ZERO,
        rate: None,
        ..options.clone()
    };
    let start = Instant::now();
    let mut engine = mux::Engine::new(&preload_options, targets, run_nonce);
    let mut io = match mux::Io::connect(targets, engine.conn_count()) {
        Ok(io) => io,
        Err(error) => {
            return Preloaded {
                written: 0,
                failed: 0,
                elapsed: start.elapsed(),
                error: Some(format!("cannot start the connector thread: {error}")),
                history: Vec::new(),
                recorded_ops: 0,
                history_overflow: false,
                history_origin: start,
            }
        }
    };
    let shared = new_shared(&preload_options, start);
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let printer = scope.spawn(|| preload_printer(&shared, options.keys, &done, progress));
        mux::run_phase(&mut engine, &mut io, &shared, mux::Phase::Preload);
        done.store(true, Ordering::Relaxed);
        printer.join().expect("preload progress thread");
    });
    drop(io);
    let elapsed = start.elapsed();
    let written = shared.preload_written.load(Ordering::Relaxed);
    let failed = shared.preload_failed.load(Ordering::Relaxed);
    let error = match engine.preload_error() {
        Some(error) => Some(format!(
            "{written} of {} keys written in {:.1} s, then {error}",
            options.keys,
            elapsed.as_secs_f64()
        )),
        None if written < options.keys => Some(format!(
            "only {written} of {} keys written within the preload time limit of {} s",
            options.keys,
            options.preload_timeout.as_secs_f64()
        )),
        None => None,
    };
    Preloaded {
        written,
        failed,
        elapsed,
        error,
        recorded_ops: shared.recorded_ops.load(Ordering::Relaxed),
        history_overflow: shared.history_overflow.load(Ordering::Relaxed),
        history_origin: shared.history_origin,
        history: engine.into_tally().history,
    }
}

/// Calls `progress` once a second while the preload runs, and once at its
/// end.
fn preload_printer(
    shared: &Shared,
    keys: u64,
    done: &AtomicBool,
    progress: &(dyn Fn(&PreloadProgress) + Sync),
) {
    let mut next = shared.start + Duration::from_secs(1);
    let mut written_before = 0;
    loop {
        let finished = done.load(Ordering::Relaxed);
        let now = Instant::now();
        if finished || now >= next {
            let written = shared.preload_written.load(Ordering::Relaxed);
            progress(&PreloadProgress {
                keys,
                written,
                failed: shared.preload_failed.load(Ordering::Relaxed),
                elapsed: now.duration_since(shared.start),
                last_second: written - written_before,
            });
            written_before = written;
            next += Duration::from_secs(1);
        }
        if finished {
            return;
        }
        std::thread::sleep(PRELOAD_POLL.min(next.saturating_duration_since(Instant::now())));
    }
}

fn new_shared(options: &LoadOptions, start: Instant) -> Shared<'_> {
    let warmup_slots = options.warmup.as_secs_f64().ceil() as usize;
    let measured_slots = (options.duration.as_secs_f64().ceil() as usize).max(1);
    let measure_from = start + options.warmup;
    let base = measure_from
        .checked_sub(Duration::from_secs(warmup_slots as u64))
        .unwrap_or(start);
    Shared {
        options,
        start,
        base,
        warmup_slots,
        measure_from,
        end: measure_from + options.duration,
        slots: (0..warmup_slots + measured_slots)
            .map(|_| Slot {
                ops: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                busy: AtomicU64::new(0),
                latency: Mutex::new(None),
            })
            .collect(),
        measured: Mutex::new(new_histogram()),
        measured_reads: Mutex::new(new_histogram()),
        measured_writes: Mutex::new(new_histogram()),
        preload_written: AtomicU64::new(0),
        preload_failed: AtomicU64::new(0),
        recorded_ops: AtomicU64::new(0),
        history_overflow: AtomicBool::new(false),
        history_origin: start,
    }
}

/// Differs from run to run, so values (and `check` keys) of two runs never
/// collide.
fn clock_seed() -> u64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    since_epoch.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
}

/// The figures of timeline slot `index`, numbered so that the first measured
/// second is 1.
fn slot_stats(shared: &Shared, index: usize) -> SecondStats {
    let slot = &shared.slots[index];
    let mut stats = SecondStats {
        second: index as i64 - shared.warmup_slots as i64 + 1,
        ops: slot.ops.load(Ordering::Relaxed),
        busy: slot.busy.load(Ordering::Relaxed),
        errors: slot.errors.load(Ordering::Relaxed),
        ..Default::default()
    };
    if let Some(histogram) = slot.latency.lock().as_ref() {
        stats.p50_ms = ms(histogram.value_at_quantile(0.5));
        stats.p99_ms = ms(histogram.value_at_quantile(0.99));
        stats.p999_ms = ms(histogram.value_at_quantile(0.999));
    }
    stats
}

/// Calls `progress` once a second, for the second just ended, until the
/// run ends. Counts are exact; latencies are merged by the clients as they
/// move on, so a client stuck in a long request shows up late.
fn report_progress(shared: &Shared, progress: &(dyn Fn(&SecondStats) + Sync)) {
    for index in 0..shared.slots.len() {
        let wake = shared.base + Duration::from_secs(index as u64 + 1) + PROGRESS_DELAY;
        let now = Instant::now();
        if wake > now {
            std::thread::sleep(wake - now);
        }
        let mut stats = slot_stats(shared, index);
        stats.p99_so_far_ms = ms(shared.measured.lock().value_at_quantile(0.99));
        progress(&stats);
    }
}

fn summarize(shared: &Shared, mut tally: Tally, mut report: Report) -> Report {
    let options = shared.options;
    tally.flush(shared);
    match tally.last_write_ack {
        Some(last) if last < shared.end => tally.note_write_gap(shared.end - last, shared.end),
        Some(_) => {}
        // A run that sends writes and gets none acknowledged: one gap.
        None if options.read_ratio < 1.0 => {
            tally.note_write_gap(shared.end - shared.measure_from, shared.end)
        }
        None => {}
    }
    let since_window = Instant::now().saturating_duration_since(shared.measure_from);
    report.window_start_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |now| (now.saturating_sub(since_window)).as_secs_f64());
    report.write_gaps = tally
        .write_gaps
        .iter()
        .map(|&(gap, ended)| {
            let ended_s = ended.duration_since(shared.measure_from).as_secs_f64();
            (gap.as_secs_f64() * 1e3, ended_s)
        })
        .collect();
    if let Some(&(gap_ms, ended_s)) = report.write_gaps.first() {
        report.max_write_gap_ms = gap_ms;
        report.max_write_gap_end_s = ended_s;
    }
    report.reads = tally.reads;
    report.writes = tally.writes;
    report.busy = tally.busy;
    let sent_measured = tally.sent_measured;
    for (kind, count) in tally.errors {
        *report.errors.entry(kind.to_string()).or_default() += count;
    }
    for (kind, sample) in tally.error_samples {
        report
            .error_samples
            .entry(kind.to_string())
            .or_insert(sample);
    }
    let last_finish = tally.last_finish.map_or(shared.end, |t| t.max(shared.end));
    let history = tally.history;
    report.ops = report.reads + report.writes;
    // As etcd-bench does: from the start of the window until the last
    // request that started inside it finished.
    report.elapsed_s = last_finish
        .duration_since(shared.measure_from)
        .as_secs_f64()
        .max(1e-9);
    report.ops_per_sec = report.ops as f64 / report.elapsed_s;
    report.scheduled = shared.scheduled_in_window();
    report.unsent = report
        .scheduled
        .map_or(0, |scheduled| scheduled.saturating_sub(sent_measured));
    let latency = shared.measured.lock();
    report.p50_ms = ms(latency.value_at_quantile(0.50));
    report.p90_ms = ms(latency.value_at_quantile(0.90));
    report.p99_ms = ms(latency.value_at_quantile(0.99));
    report.p999_ms = ms(latency.value_at_quantile(0.999));
    report.max_ms = ms(latency.max());
    report.mean_ms = latency.mean() / 1000.0;
    report.read_latency = LatencySummary::of(&shared.measured_reads.lock());
    report.write_latency = LatencySummary::of(&shared.measured_writes.lock());
    report.seconds = (shared.warmup_slots..shared.slots.len())
        .map(|index| slot_stats(shared, index))
        .collect();
    if options.check {
        report.checked_ops = history.len();
        report.checked_keys = options.keys.div_ceil(check_stride(options.keys));
        report.check = Some(if shared.history_overflow.load(Ordering::Relaxed) {
            format!(
                "skipped: more than {} operations on the sampled keys (run shorter or with fewer keys)",
                options.max_checked_ops
            )
        } else {
            verdict_text(check::check(&history, CHECK_TIMEOUT))
        });
    }
    report
}

fn verdict_text(verdict: Verdict) -> String {
    match verdict {
        Verdict::Linearizable => "linearizable".to_string(),
        Verdict::NotLinearizable { key, ops } => format!(
            "not linearizable on key {key} ({} operations in the smallest failing prefix)",
            ops.len()
        ),
        Verdict::Timeout => "timeout".to_string(),
    }
}

impl Report {
    /// Failed operations of every kind.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// One JSON object with the fields compare.sh and etcd-bench share
    /// (`ops_per_sec`, `p50_ms` ... `max_ms`, `errors`, `ops`, `reads`,
    /// `writes`, `elapsed_s`, `client_cpu_s`) plus our own.
    pub fn to_json(&self, options: &LoadOptions) -> serde_json::Value {
        let mut json = serde_json::json!({
            "ops_per_sec": self.ops_per_sec,
            "ops": self.ops,
            "reads": self.reads,
            "writes": self.writes,
            "elapsed_s": self.elapsed_s,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "p999_ms": self.p999_ms,
            "max_ms": self.max_ms,
            "mean_ms": self.mean_ms,
            "errors": self.errors,
            "error_samples": self.error_samples,
            "busy": self.busy,
            "scheduled": self.scheduled,
            "unsent": self.unsent,
            "client_cpu_s": self.client_cpu_s,
            "preload_keys": self.preload_keys,
            "preload_errors": self.preload_errors,
            "preload_s": self.preload_s,
            "clients": options.clients,
            "conns_per_node": self.conns_per_node,
            "duration_s": options.duration.as_secs_f64(),
            "warmup_s": options.warmup.as_secs_f64(),
            "value_size": options.value_size_bytes,
            "random_values": options.random_values,
            "keys": options.keys,
            "read_ratio": options.read_ratio,
            "rate": options.rate,
            "check": self.check,
            "checked_ops": self.checked_ops,
            "checked_keys": self.checked_keys,
            "timeline": self.seconds.iter().map(|s| serde_json::json!({
                "second": s.second, "ops": s.ops, "p50_ms": s.p50_ms, "p99_ms": s.p99_ms,
                "p999_ms": s.p999_ms,
                "busy": s.busy, "errors": s.errors,
            })).collect::<Vec<_>>(),
        });
        // Added apart: one json! this large passes the macro recursion limit.
        json["preload_error"] = serde_json::json!(self.preload_error);
        json["preload_clients"] = serde_json::json!(options.preload_clients);
        json["read_latency"] = self.read_latency.to_json();
        json["write_latency"] = self.write_latency.to_json();
        json["max_write_gap_ms"] = serde_json::json!(self.max_write_gap_ms);
        json["max_write_gap_end_s"] = serde_json::json!(self.max_write_gap_end_s);
        json["window_start_unix_s"] = serde_json::json!(self.window_start_unix_s);
        json["write_gaps"] = self
            .write_gaps
            .iter()
            .map(|&(ms, end_s)| serde_json::json!({"ms": ms, "end_s": end_s}))
            .collect();
        json
    }

    /// A human-readable summary.
    pub fn to_text(&self) -> String {
        let mut text = String::new();
        let _ = writeln!(
            text,
            "ops/s {:.0} ({} ops in {:.2} s: {} gets, {} puts)",
            self.ops_per_sec, self.ops, self.elapsed_s, self.reads, self.writes
        );
        let _ = writeln!(
            text,
            "latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms
        );
        for (kind, count, latency) in [
            ("gets", self.reads, self.read_latency),
            ("puts", self.writes, self.write_latency),
        ] {
            if count > 0 && count < self.ops {
                let _ = writeln!(
                    text,
                    "  {kind} ms: p50 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                    latency.p50_ms, latency.p99_ms, latency.p999_ms, latency.max_ms
                );
            }
        }
        if self.writes > 0 {
            let _ = writeln!(
                text,
                "longest time with no write acknowledged: {:.1} ms (ended {:.2} s into the window)",
                self.max_write_gap_ms, self.max_write_gap_end_s
            );
        }
        let _ = writeln!(text, "busy (pushed back and retried): {}", self.busy);
        if let Some(scheduled) = self.scheduled {
            let _ = writeln!(
                text,
                "open loop: {scheduled} requests scheduled, {} never sent",
                self.unsent
            );
        }
        let _ = writeln!(text, "errors: {} {:?}", self.error_count(), self.errors);
        for (kind, sample) in &self.error_samples {
            let _ = writeln!(text, "  first {kind}: {sample}");
        }
        if self.preload_keys + self.preload_errors > 0 || self.preload_error.is_some() {
            let _ = writeln!(
                text,
                "preload: {} keys in {:.2} s ({:.0} keys/s), {} failed",
                self.preload_keys,
                self.preload_s,
                self.preload_keys as f64 / self.preload_s.max(1e-9),
                self.preload_errors
            );
        }
        if let Some(error) = &self.preload_error {
            let _ = writeln!(text, "preload failed: {error}");
        }
        let _ = writeln!(
            text,
            "loadgen cpu: {:.2} s ({:.1} µs per op)",
            self.client_cpu_s,
            self.client_cpu_s * 1e6 / self.ops.max(1) as f64
        );
        if let Some(check) = &self.check {
            let _ = writeln!(
                text,
                "check ({} ops on {} keys): {check}",
                self.checked_ops, self.checked_keys
            );
        }
        text
    }

    /// An SVG picture of the timeline (see [`plot`]) under `title`.
    pub fn to_svg(&self, title: &str) -> Result<String, String> {
        plot::timeline_svg(title, &self.seconds)
    }
}
