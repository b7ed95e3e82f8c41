//! The load generator behind `loadgen`: N clerks against a cluster, closed
//! loop (one request in flight each) or open loop (`rate`: requests are
//! scheduled at fixed times whatever the latency, and latency counts from
//! the scheduled time, so a slow cluster cannot hide its queueing —
//! no coordinated omission). It reports throughput, HDR-histogram latency
//! percentiles, errors by kind, and the requests the LockQueue pushed back
//! (BUSY) that the clerks retried. With `check`, every operation is recorded
//! and the history goes through the linearizability checker at the end.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::Mutex;

use crate::check::{self, KvInput, KvOutput, Operation, Verdict};
use crate::clerk::{Clerk, ClerkError};
use crate::raft::SplitMix64;

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub clients: usize,
    pub duration: Duration,
    /// Unmeasured time at the start.
    pub warmup: Duration,
    pub value_size_bytes: usize,
    pub keys: u64,
    /// The fraction of operations that are (linearizable) gets.
    pub read_ratio: f64,
    /// Open loop at this many operations per second, spread over the clients.
    pub rate: Option<f64>,
    /// Record the history and check it.
    pub check: bool,
    /// The most operations recorded for `check`.
    pub max_checked_ops: usize,
    pub seed: u64,
}

/// One second of the run, for progress lines and the plot.
#[derive(Clone, Debug, Default)]
pub struct SecondStats {
    pub second: u64,
    pub ops: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub busy: u64,
    pub errors: u64,
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
    /// Requests answered BUSY by the LockQueue and retried by the clerks.
    pub busy: u64,
    pub seconds: Vec<SecondStats>,
    /// "linearizable", "not linearizable: ..." or "timeout", with `check`.
    pub check: Option<String>,
    pub checked_ops: usize,
}

/// Counters the clients bump and the progress printer reads.
#[derive(Default)]
struct Live {
    ops: AtomicU64,
    errors: AtomicU64,
}

/// Per-second histograms and BUSY counts, merged from the clients once a
/// second each.
struct Timeline {
    seconds: Mutex<Vec<(Histogram<u64>, u64)>>,
}

fn new_histogram() -> Histogram<u64> {
    // Microseconds from 1 µs to 1000 s, 3 significant digits.
    Histogram::new_with_bounds(1, 1_000_000_000, 3).expect("valid histogram bounds")
}

struct ClientResult {
    latency: Histogram<u64>,
    reads: u64,
    writes: u64,
    errors: BTreeMap<String, u64>,
    busy: u64,
    history: Vec<Operation>,
    last_finish: Instant,
}

/// Runs the load with clerks from `make_clerk` (one per client) and
/// reports. `progress` is called once a second with that second's figures.
pub fn run(
    options: &LoadOptions,
    make_clerk: &(dyn Fn(usize) -> Clerk + Sync),
    progress: &(dyn Fn(&SecondStats) + Sync),
) -> Report {
    assert!(options.clients > 0, "at least one client");
    let epoch = Instant::now();
    let measure_from = epoch + options.warmup;
    let end = measure_from + options.duration;
    let live = Live::default();
    let timeline = Timeline {
        seconds: Mutex::new(Vec::new()),
    };
    let recorded_ops = AtomicU64::new(0);
    let results: Vec<ClientResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..options.clients)
            .map(|client| {
                let (live, timeline, recorded_ops) = (&live, &timeline, &recorded_ops);
                std::thread::Builder::new()
                    .name(format!("loadgen-{client}"))
                    .spawn_scoped(scope, move || {
                        let clerk = make_clerk(client);
                        let window = Window {
                            epoch,
                            measure_from,
                            end,
                        };
                        run_client(options, client, clerk, window, live, timeline, recorded_ops)
                    })
                    .expect("spawn a client thread")
            })
            .collect();
        report_progress(&live, &timeline, epoch, end, progress);
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    summarize(options, results, timeline, measure_from, end)
}

#[derive(Clone, Copy)]
struct Window {
    epoch: Instant,
    measure_from: Instant,
    end: Instant,
}

/// Prints one line a second until the run ends.
fn report_progress(
    live: &Live,
    timeline: &Timeline,
    epoch: Instant,
    end: Instant,
    progress: &(dyn Fn(&SecondStats) + Sync),
) {
    let mut second = 1u64;
    let mut last_ops = 0;
    let mut last_errors = 0;
    while Instant::now() < end {
        let wake = epoch + Duration::from_secs(second);
        let now = Instant::now();
        if wake > now {
            std::thread::sleep(wake - now);
        }
        let (ops, errors) = (
            live.ops.load(Ordering::Relaxed),
            live.errors.load(Ordering::Relaxed),
        );
        let mut stats = SecondStats {
            second,
            ops: ops - last_ops,
            errors: errors - last_errors,
            ..Default::default()
        };
        (last_ops, last_errors) = (ops, errors);
        // Clients merge a second's histogram once they move past it, so
        // the previous second is complete (or nearly) by now.
        if let Some((histogram, busy)) = timeline.seconds.lock().get(second as usize - 1) {
            stats.p50_ms = histogram.value_at_quantile(0.5) as f64 / 1000.0;
            stats.p99_ms = histogram.value_at_quantile(0.99) as f64 / 1000.0;
            stats.busy = *busy;
        }
        progress(&stats);
        second += 1;
    }
}

fn key_name(k: u64) -> String {
    format!("key{k:08}")
}

/// An ASCII value of `size` bytes, unique per (client, n), so a history of
/// puts can tell values apart.
fn value_for(client: usize, n: u64, size: usize) -> String {
    let mut value = format!("v{client}-{n}-");
    while value.len() < size {
        value.push('x');
    }
    value.truncate(size.max(1));
    value
}

#[allow(clippy::too_many_arguments)]
fn run_client(
    options: &LoadOptions,
    client: usize,
    mut clerk: Clerk,
    window: Window,
    live: &Live,
    timeline: &Timeline,
    recorded_ops: &AtomicU64,
) -> ClientResult {
    let mut rng =
        SplitMix64::new(options.seed ^ (client as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut result = ClientResult {
        latency: new_histogram(),
        reads: 0,
        writes: 0,
        errors: BTreeMap::new(),
        busy: 0,
        history: Vec::new(),
        last_finish: window.measure_from,
    };
    let mut second_histogram = new_histogram();
    let mut second_index = 0usize;
    let mut second_busy = 0u64;
    let interval = options
        .rate
        .map(|rate| Duration::from_secs_f64(options.clients as f64 / rate));
    let mut next_start = window.epoch
        + interval.map_or(Duration::ZERO, |i| {
            i.mul_f64(client as f64 / options.clients as f64)
        });
    let mut n = 0u64;
    let read_threshold = (options.read_ratio.clamp(0.0, 1.0) * 1_000_000.0) as u64;
    loop {
        // Open loop: wait for the scheduled time (never skip a slot).
        let scheduled = match interval {
            Some(interval) => {
                let scheduled = next_start;
                next_start += interval;
                let now = Instant::now();
                if scheduled > now {
                    std::thread::sleep(scheduled - now);
                }
                scheduled
            }
            None => Instant::now(),
        };
        if scheduled >= window.end {
            break;
        }
        n += 1;
        let key = key_name(rng.range(0, options.keys.max(1)));
        let is_read = rng.range(0, 1_000_000) < read_threshold;
        let busy_before = clerk.busy_retries();
        let call_us = window.epoch.elapsed().as_micros() as u64;
        let (input, outcome) = if is_read {
            let outcome = clerk.get(key.as_bytes()).map(|v| KvOutput::Get {
                value: v.map(|v| String::from_utf8_lossy(&v).into_owned()),
            });
            (KvInput::Get { key }, outcome)
        } else {
            let value = value_for(client, n, options.value_size_bytes);
            let outcome = clerk
                .put(key.as_bytes(), value.as_bytes())
                .map(|()| KvOutput::Put);
            (KvInput::Put { key, value }, outcome)
        };
        let finished = Instant::now();
        let measured = scheduled >= window.measure_from;
        let busy = clerk.busy_retries() - busy_before;
        second_busy += busy;
        if measured {
            result.busy += busy;
        }
        let return_us = finished.duration_since(window.epoch).as_micros() as u64;
        let output = match outcome {
            Ok(output) => {
                if measured {
                    let latency_us = finished.duration_since(scheduled).as_micros().max(1) as u64;
                    result.latency.saturating_record(latency_us);
                    second_histogram.saturating_record(latency_us);
                    if is_read {
                        result.reads += 1;
                    } else {
                        result.writes += 1;
                    }
                    result.last_finish = result.last_finish.max(finished);
                    live.ops.fetch_add(1, Ordering::Relaxed);
                }
                Some(output)
            }
            Err(error) => {
                if measured {
                    let kind = match error {
                        ClerkError::Timeout { .. } => "timeout",
                        ClerkError::Rejected(_) => "rejected",
                    };
                    *result.errors.entry(kind.to_string()).or_default() += 1;
                    live.errors.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
        };
        if options.check
            && recorded_ops.fetch_add(1, Ordering::Relaxed) < options.max_checked_ops as u64
        {
            let return_us = output.as_ref().map(|_| return_us);
            let client_id = clerk.client_id();
            result.history.push(Operation {
                client_id,
                input,
                call_us,
                output,
                return_us,
            });
        }
        let now_second = finished.duration_since(window.epoch).as_secs() as usize;
        if now_second > second_index {
            merge_second(
                timeline,
                second_index,
                &mut second_histogram,
                &mut second_busy,
            );
            second_index = now_second;
        }
    }
    merge_second(
        timeline,
        second_index,
        &mut second_histogram,
        &mut second_busy,
    );
    result
}

fn merge_second(
    timeline: &Timeline,
    second: usize,
    histogram: &mut Histogram<u64>,
    busy: &mut u64,
) {
    let mut seconds = timeline.seconds.lock();
    while seconds.len() <= second {
        seconds.push((new_histogram(), 0));
    }
    let slot = &mut seconds[second];
    slot.0.add(&*histogram).expect("same histogram bounds");
    slot.1 += *busy;
    histogram.reset();
    *busy = 0;
}

fn summarize(
    options: &LoadOptions,
    results: Vec<ClientResult>,
    timeline: Timeline,
    measure_from: Instant,
    end: Instant,
) -> Report {
    let mut latency = new_histogram();
    let mut report = Report::default();
    let mut last_finish = end;
    let mut history = Vec::new();
    for result in results {
        latency.add(&result.latency).expect("same histogram bounds");
        report.reads += result.reads;
        report.writes += result.writes;
        report.busy += result.busy;
        for (kind, count) in result.errors {
            *report.errors.entry(kind).or_default() += count;
        }
        last_finish = last_finish.max(result.last_finish);
        history.extend(result.history);
    }
    report.ops = report.reads + report.writes;
    // As etcd-bench does: from the start of the window until the last
    // request that started inside it finished.
    report.elapsed_s = last_finish
        .duration_since(measure_from)
        .as_secs_f64()
        .max(1e-9);
    report.ops_per_sec = report.ops as f64 / report.elapsed_s;
    let ms = |us: u64| us as f64 / 1000.0;
    report.p50_ms = ms(latency.value_at_quantile(0.50));
    report.p90_ms = ms(latency.value_at_quantile(0.90));
    report.p99_ms = ms(latency.value_at_quantile(0.99));
    report.p999_ms = ms(latency.value_at_quantile(0.999));
    report.max_ms = ms(latency.max());
    report.mean_ms = latency.mean() / 1000.0;
    let warmup_seconds = options.warmup.as_secs() as usize;
    let seconds = timeline.seconds.into_inner();
    for (index, (histogram, busy)) in seconds.into_iter().enumerate().skip(warmup_seconds) {
        report.seconds.push(SecondStats {
            second: (index - warmup_seconds) as u64 + 1,
            ops: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.5)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            busy,
            errors: 0,
        });
    }
    if options.check {
        report.checked_ops = history.len();
        report.check = Some(match check::check(&history, Duration::from_secs(60)) {
            Verdict::Linearizable => "linearizable".to_string(),
            Verdict::NotLinearizable { key, ops } => {
                format!(
                    "not linearizable on key {key} ({} operations in the smallest failing prefix)",
                    ops.len()
                )
            }
            Verdict::Timeout => "timeout".to_string(),
        });
    }
    report
}

impl Report {
    /// One JSON object with the fields compare.sh and etcd-bench share.
    pub fn to_json(&self, options: &LoadOptions) -> serde_json::Value {
        serde_json::json!({
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
            "busy": self.busy,
            "clients": options.clients,
            "duration_s": options.duration.as_secs_f64(),
            "value_size": options.value_size_bytes,
            "keys": options.keys,
            "read_ratio": options.read_ratio,
            "rate": options.rate,
            "check": self.check,
            "checked_ops": self.checked_ops,
            "timeline": self.seconds.iter().map(|s| serde_json::json!({
                "second": s.second, "ops": s.ops, "p50_ms": s.p50_ms, "p99_ms": s.p99_ms, "busy": s.busy
            })).collect::<Vec<_>>(),
        })
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
        let _ = writeln!(text, "busy (pushed back and retried): {}", self.busy);
        let errors: u64 = self.errors.values().sum();
        let _ = writeln!(text, "errors: {errors} {:?}", self.errors);
        if let Some(check) = &self.check {
            let _ = writeln!(text, "check ({} ops): {check}", self.checked_ops);
        }
        text
    }

    /// An SVG picture of throughput and p50/p99 latency per second.
    pub fn to_svg(&self) -> String {
        plot_svg(&self.seconds)
    }
}

/// A two-panel line chart (ops/s above, p50 and p99 latency below) written
/// as plain SVG: a handful of polylines, axes and labels.
fn plot_svg(seconds: &[SecondStats]) -> String {
    const WIDTH: f64 = 800.0;
    const PANEL_HEIGHT: f64 = 220.0;
    const LEFT: f64 = 70.0;
    const TOP: f64 = 30.0;
    const GAP: f64 = 60.0;
    let plot_width = WIDTH - LEFT - 20.0;
    let count = seconds.len().max(1) as f64;
    let x = |i: usize| LEFT + plot_width * (i as f64 + 0.5) / count;
    let max_ops = seconds.iter().map(|s| s.ops).max().unwrap_or(0).max(1) as f64;
    let max_ms = seconds
        .iter()
        .map(|s| s.p99_ms.max(s.p50_ms))
        .fold(0.0, f64::max)
        .max(0.001);
    let mut svg = String::new();
    let height = TOP + 2.0 * PANEL_HEIGHT + GAP + 40.0;
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let panels = [
        (
            "throughput (ops/s)",
            TOP,
            max_ops,
            vec![(
                "ops/s",
                "#1f77b4",
                seconds.iter().map(|s| s.ops as f64).collect::<Vec<_>>(),
            )],
        ),
        (
            "latency (ms)",
            TOP + PANEL_HEIGHT + GAP,
            max_ms,
            vec![
                ("p50", "#2ca02c", seconds.iter().map(|s| s.p50_ms).collect()),
                ("p99", "#d62728", seconds.iter().map(|s| s.p99_ms).collect()),
            ],
        ),
    ];
    for (title, top, max, series) in panels {
        let bottom = top + PANEL_HEIGHT;
        let _ = writeln!(
            svg,
            r#"<text x="{LEFT}" y="{}" font-weight="bold">{title}</text>"#,
            top - 8.0
        );
        let _ = writeln!(
            svg,
            r#"<line x1="{LEFT}" y1="{bottom}" x2="{}" y2="{bottom}" stroke="black"/>"#,
            LEFT + plot_width
        );
        let _ = writeln!(
            svg,
            r#"<line x1="{LEFT}" y1="{top}" x2="{LEFT}" y2="{bottom}" stroke="black"/>"#
        );
        for tick in 0..=4 {
            let value = max * tick as f64 / 4.0;
            let y = bottom - PANEL_HEIGHT * tick as f64 / 4.0;
            let _ = writeln!(
                svg,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                LEFT - 6.0,
                y + 4.0,
                format_tick(value)
            );
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/>"##,
                LEFT + plot_width
            );
        }
        for (k, (name, color, values)) in series.iter().enumerate() {
            let points: Vec<String> = values
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    format!(
                        "{:.1},{:.1}",
                        x(i),
                        bottom - PANEL_HEIGHT * (v / max).min(1.0)
                    )
                })
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                points.join(" ")
            );
            let legend_x = LEFT + plot_width - 80.0;
            let _ = writeln!(
                svg,
                r#"<text x="{legend_x}" y="{}" fill="{color}">{name}</text>"#,
                top + 14.0 + 14.0 * k as f64
            );
        }
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">second of the run</text>"#,
        LEFT + plot_width / 2.0,
        height - 10.0
    );
    svg.push_str("</svg>\n");
    svg
}

fn format_tick(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 1.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.3}")
    }
}
