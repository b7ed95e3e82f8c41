//! `loadgen`: drives a kvstore-raft cluster with N logical clients
//! (multiplexed over `--conns` connections per node) and reports
//! throughput, latency percentiles, errors and backpressure; see `--help`
//! and the README's performance section. A progress line goes to stderr
//! each second; the result goes to stdout, as text or (`--json`) as one
//! JSON object on the last line. `--preload` first writes every key once
//! with many operations in flight, with a progress line (keys/s, ETA) each
//! second.
//!
//! Exit status: 0 when the run completed; 1 when the preload did not write
//! every key, no operation succeeded, the check found the history not
//! linearizable (or could not decide), or the plot could not be written; 3
//! for bad arguments or a bad config file (one line on stderr).

use std::process::ExitCode;
use std::time::Duration;

use kvstore_raft::config::ClusterConfig;
use kvstore_raft::loadgen::{
    self, LoadOptions, PreloadProgress, Report, SecondStats, Targets, MAX_RUN_SECS,
};

const USAGE: &str = "usage: loadgen [--config FILE] --clients N --duration SECS [--warmup SECS] \
[--value-size BYTES] [--random-values] [--keys K] [--read-ratio R] [--rate OPS] [--conns C] [--preload] \
[--preload-only] [--preload-clients N] [--preload-timeout SECS] [--timeout SECS] [--json] [--plot FILE.svg] [--check] [--seed S]";
const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 3;
/// Bounds of the numeric options: generous, but they keep a typo from
/// asking for a million threads or a year-long run.
const MAX_CLIENTS: usize = 4096;
const MAX_CONNS: usize = 64;
/// Connections per node unless `--conns` says otherwise (see
/// /work/notes/lgmux-results.md for the measurements behind it).
const DEFAULT_CONNS: usize = 1;
const MAX_KEYS: u64 = 1_000_000_000;
const MAX_RATE: f64 = 10_000_000.0;
const MAX_TIMEOUT_SECS: f64 = 3600.0;
/// Preload writes in flight unless `--preload-clients` says otherwise:
/// enough to keep the leader's batches full (see the README's
/// performance section for the measurements behind it).
const DEFAULT_PRELOAD_CLIENTS: usize = 512;
/// The preload's time limit unless `--preload-timeout` says otherwise.
const DEFAULT_PRELOAD_TIMEOUT_SECS: f64 = 3600.0;
/// The most operations `--check` records.
const MAX_CHECKED_OPS: usize = 200_000;

struct Args {
    config: String,
    load: LoadOptions,
    timeout: Duration,
    json: bool,
    plot: Option<String>,
}

/// The value of `--name` parsed as `T`, or `default` when it is absent.
fn number<T: std::str::FromStr>(
    matches: &getopts::Matches,
    name: &str,
    default: Option<T>,
) -> Result<T, String> {
    match matches.opt_str(name) {
        Some(text) => text
            .parse()
            .map_err(|_| format!("--{name} {text:?} is not a valid number")),
        None => default.ok_or_else(|| format!("--{name} is required")),
    }
}

/// `value` when it lies in `[low, high]`, else an error naming the option.
fn within<T: PartialOrd + std::fmt::Display>(
    name: &str,
    value: T,
    low: T,
    high: T,
) -> Result<T, String> {
    if value >= low && value <= high {
        Ok(value)
    } else {
        Err(format!("--{name} {value} is not between {low} and {high}"))
    }
}

/// Seconds as a Duration, checked to lie in `[low, high]` (NaN never does).
fn seconds(
    matches: &getopts::Matches,
    name: &str,
    default: Option<f64>,
    low: f64,
    high: f64,
) -> Result<Duration, String> {
    let secs = within(name, number(matches, name, default)?, low, high)?;
    Ok(Duration::from_secs_f64(secs))
}

fn options() -> getopts::Options {
    let mut opts = getopts::Options::new();
    opts.optopt(
        "",
        "config",
        "cluster file (default conf/cluster.json)",
        "FILE",
    );
    opts.optopt(
        "",
        "clients",
        "concurrent clients, one session and one request in flight each",
        "N",
    );
    opts.optopt(
        "",
        "conns",
        "connections per node, shared by the clients (default 1; more when \
         there are over 256 clients per connection)",
        "C",
    );
    opts.optopt("", "duration", "measured seconds", "SECS");
    opts.optopt("", "warmup", "unmeasured seconds first (default 0)", "SECS");
    opts.optopt("", "value-size", "bytes per value (default 256)", "BYTES");
    opts.optflag(
        "",
        "random-values",
        "fill values with random letters and digits (incompressible) instead of \
         one repeated byte",
    );
    opts.optopt("", "keys", "keys, chosen uniformly (default 10000)", "K");
    opts.optopt(
        "",
        "read-ratio",
        "fraction of gets, 0 to 1 (default 0)",
        "R",
    );
    opts.optopt(
        "",
        "rate",
        "open loop: operations per second in total, sent by the N clients; \
         latency counts from the scheduled time",
        "OPS",
    );
    opts.optflag(
        "",
        "preload",
        "write every key once before the run (unmeasured); the run does not \
         start unless every key was written",
    );
    opts.optflag("", "preload-only", "preload, then stop (no measured run)");
    opts.optopt(
        "",
        "preload-clients",
        "writes in flight during the preload, each its own session \
         (default 512)",
        "N",
    );
    opts.optopt(
        "",
        "preload-timeout",
        "give up the preload after this long (default 3600)",
        "SECS",
    );
    opts.optopt("", "timeout", "per-operation deadline (default 10)", "SECS");
    opts.optopt(
        "",
        "seed",
        "seed of the key and op choices (default 1)",
        "S",
    );
    opts.optflag("", "json", "print the result as one JSON object");
    opts.optopt(
        "",
        "plot",
        "write ops/s, p50/p99/p99.9 latency, BUSY and errors per second as SVG",
        "FILE",
    );
    opts.optflag(
        "",
        "check",
        "record the operations (on at most 1000 keys) and check linearizability; \
         uses keys of this run only",
    );
    opts.optflag("h", "help", "print this help");
    opts
}

fn parse_args(argv: &[String]) -> Result<Option<Args>, String> {
    let opts = options();
    let matches = opts.parse(argv).map_err(|e| e.to_string())?;
    if matches.opt_present("help") {
        println!("{}", opts.usage(USAGE));
        return Ok(None);
    }
    if let Some(extra) = matches.free.first() {
        return Err(format!("unexpected argument {extra:?}"));
    }
    let rate = match matches.opt_str("rate") {
        Some(_) => Some(within(
            "rate",
            number(&matches, "rate", None)?,
            0.001,
            MAX_RATE,
        )?),
        None => None,
    };
    let max_run_secs = MAX_RUN_SECS as f64 / 2.0;
    let preload_only = matches.opt_present("preload-only");
    // With --preload-only the measured run never happens: no duration needed.
    let duration_default = preload_only.then_some(1.0);
    let load = LoadOptions {
        clients: within(
            "clients",
            number(&matches, "clients", None)?,
            1,
            MAX_CLIENTS,
        )?,
        conns_per_node: within(
            "conns",
            number(&matches, "conns", Some(DEFAULT_CONNS))?,
            1,
            MAX_CONNS,
        )?,
        duration: seconds(&matches, "duration", duration_default, 0.001, max_run_secs)?,
        warmup: seconds(&matches, "warmup", Some(0.0), 0.0, max_run_secs)?,
        value_size_bytes: within(
            "value-size",
            number(&matches, "value-size", Some(256))?,
            1,
            usize::MAX,
        )?,
        random_values: matches.opt_present("random-values"),
        keys: within("keys", number(&matches, "keys", Some(10_000))?, 1, MAX_KEYS)?,
        read_ratio: within(
            "read-ratio",
            number(&matches, "read-ratio", Some(0.0))?,
            0.0,
            1.0,
        )?,
        rate,
        preload: matches.opt_present("preload") || preload_only,
        preload_clients: within(
            "preload-clients",
            number(&matches, "preload-clients", Some(DEFAULT_PRELOAD_CLIENTS))?,
            1,
            MAX_CLIENTS,
        )?,
        preload_timeout: seconds(
            &matches,
            "preload-timeout",
            Some(DEFAULT_PRELOAD_TIMEOUT_SECS),
            0.001,
            max_run_secs,
        )?,
        preload_only,
        check: matches.opt_present("check"),
        max_checked_ops: MAX_CHECKED_OPS,
        seed: number(&matches, "seed", Some(1))?,
    };
    Ok(Some(Args {
        config: matches
            .opt_str("config")
            .unwrap_or_else(|| "conf/cluster.json".into()),
        load,
        timeout: seconds(&matches, "timeout", Some(10.0), 0.001, MAX_TIMEOUT_SECS)?,
        json: matches.opt_present("json"),
        plot: matches.opt_str("plot"),
    }))
}

/// The cluster file, with the value size checked against its limit.
fn load_config(args: &Args) -> Result<ClusterConfig, String> {
    let config = ClusterConfig::load(&args.config).map_err(|e| e.to_string())?;
    let max_value_bytes = config.max_append_bytes / 2;
    if args.load.value_size_bytes > max_value_bytes {
        return Err(format!(
            "--value-size {} is above this cluster's limit of {max_value_bytes} bytes \
             (half of max_append_bytes in {})",
            args.load.value_size_bytes, args.config
        ));
    }
    Ok(config)
}

fn print_progress(s: &SecondStats) {
    let label = if s.is_warmup() { " warmup" } else { "" };
    eprintln!(
        "[{:>4}s]{label} {:>8} ops/s  p99 so far {:>8.3} ms  busy/s {:>6}  errors/s {:>5}",
        s.second, s.ops, s.p99_so_far_ms, s.busy, s.errors
    );
}

fn print_preload_progress(p: &PreloadProgress) {
    let eta = p.eta().map_or_else(
        || "?".to_string(),
        |eta| format!("{:.0} s", eta.as_secs_f64()),
    );
    eprintln!(
        "[preload {:>5.0}s] {:>10} / {} keys ({:5.1}%)  {:>7} keys/s now  {:>7.0} keys/s average  \
         ETA {eta}  failed {}",
        p.elapsed.as_secs_f64(),
        p.written,
        p.keys,
        100.0 * p.written as f64 / p.keys.max(1) as f64,
        p.last_second,
        p.average_per_sec(),
        p.failed
    );
}

/// The plot's title: what ran.
fn plot_title(load: &LoadOptions) -> String {
    let mode = match load.rate {
        Some(rate) => format!("open loop at {rate} ops/s, {} clients", load.clients),
        None => format!("{} clients", load.clients),
    };
    format!(
        "loadgen: {mode}, {:.0}% gets, {} keys{}, {}-byte values, {} s",
        load.read_ratio * 100.0,
        load.keys,
        if load.preload { " (preloaded)" } else { "" },
        load.value_size_bytes,
        load.duration.as_secs_f64()
    )
}

/// Why the run counts as failed, if it does.
fn failure(args: &Args, report: &Report) -> Option<String> {
    if let Some(error) = &report.preload_error {
        return Some(format!("preload failed: {error}"));
    }
    if args.load.preload_only {
        return None;
    }
    if report.ops == 0 {
        let first = report.error_samples.values().next();
        return Some(format!(
            "no operation succeeded ({} errors{})",
            report.error_count(),
            first.map(|e| format!("; first: {e}")).unwrap_or_default()
        ));
    }
    match report.check.as_deref() {
        Some(check) if check != "linearizable" => Some(format!("check: {check}")),
        _ => None,
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("loadgen: {message} ({USAGE})");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let config = match load_config(&args) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("loadgen: {message}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let targets = Targets::from_config(&config, args.timeout);
    let report = loadgen::run(
        &args.load,
        &targets,
        &print_progress,
        &print_preload_progress,
    );
    let mut status = ExitCode::SUCCESS;
    if let (Some(path), false) = (&args.plot, args.load.preload_only) {
        let written = report
            .to_svg(&plot_title(&args.load))
            .and_then(|svg| std::fs::write(path, svg).map_err(|e| e.to_string()));
        if let Err(e) = written {
            eprintln!("loadgen: cannot write the plot to {path}: {e}");
            status = ExitCode::from(EXIT_FAILED);
        }
    }
    if args.json {
        println!("{}", report.to_json(&args.load));
    } else {
        print!("{}", report.to_text());
    }
    if let Some(reason) = failure(&args, &report) {
        eprintln!("loadgen: {reason}");
        status = ExitCode::from(EXIT_FAILED);
    }
    status
}
