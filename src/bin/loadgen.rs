//! `loadgen`: drives a kvstore-raft cluster with N clerks and reports
//! throughput, latency percentiles, errors and backpressure. See
//! `loadgen --help` and the README's performance section.

use std::process::ExitCode;
use std::time::Duration;

use kvstore_raft::clerk::{Clerk, ClerkOptions};
use kvstore_raft::config::ClusterConfig;
use kvstore_raft::loadgen::{self, LoadOptions};

const USAGE: &str = "usage: loadgen [--config FILE] --clients N --duration SECS [--warmup SECS] \
--value-size BYTES --keys K --read-ratio R [--rate OPS] [--timeout SECS] [--json] [--plot FILE.svg] [--check] [--seed S]";

struct Args {
    config: String,
    load: LoadOptions,
    timeout: Duration,
    json: bool,
    plot: Option<String>,
}

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

fn parse_args(argv: &[String]) -> Result<Option<Args>, String> {
    let mut opts = getopts::Options::new();
    opts.optopt(
        "",
        "config",
        "the cluster file (default conf/cluster.json)",
        "FILE",
    );
    opts.optopt("", "clients", "concurrent clerks", "N");
    opts.optopt("", "duration", "measured seconds", "SECS");
    opts.optopt("", "warmup", "unmeasured seconds first (default 0)", "SECS");
    opts.optopt("", "value-size", "bytes per value (default 256)", "BYTES");
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
        "open loop: operations per second in total",
        "OPS",
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
        "write throughput and latency per second as SVG",
        "FILE",
    );
    opts.optflag("", "check", "record the history and check linearizability");
    opts.optflag("h", "help", "print this help");
    let matches = opts.parse(argv).map_err(|e| e.to_string())?;
    if matches.opt_present("help") {
        println!("{}", opts.usage(USAGE));
        return Ok(None);
    }
    if let Some(extra) = matches.free.first() {
        return Err(format!("unexpected argument {extra:?}"));
    }
    let read_ratio: f64 = number(&matches, "read-ratio", Some(0.0))?;
    if !(0.0..=1.0).contains(&read_ratio) {
        return Err(format!("--read-ratio {read_ratio} is not between 0 and 1"));
    }
    let clients: usize = number(&matches, "clients", None)?;
    if clients == 0 || clients > 4096 {
        return Err(format!("--clients {clients} is not between 1 and 4096"));
    }
    let rate: Option<f64> = match matches.opt_str("rate") {
        Some(_) => Some(number(&matches, "rate", None)?),
        None => None,
    };
    if rate.is_some_and(|r: f64| r.is_nan() || r <= 0.0) {
        return Err("--rate must be positive".into());
    }
    let load = LoadOptions {
        clients,
        duration: Duration::from_secs_f64(number(&matches, "duration", None)?),
        warmup: Duration::from_secs_f64(number(&matches, "warmup", Some(0.0))?),
        value_size_bytes: number(&matches, "value-size", Some(256))?,
        keys: number(&matches, "keys", Some(10_000))?,
        read_ratio,
        rate,
        check: matches.opt_present("check"),
        max_checked_ops: 200_000,
        seed: number(&matches, "seed", Some(1))?,
    };
    Ok(Some(Args {
        config: matches
            .opt_str("config")
            .unwrap_or_else(|| "conf/cluster.json".into()),
        load,
        timeout: Duration::from_secs_f64(number(&matches, "timeout", Some(10.0))?),
        json: matches.opt_present("json"),
        plot: matches.opt_str("plot"),
    }))
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("loadgen: {message}\n{USAGE}");
            return ExitCode::from(3);
        }
    };
    let config = match ClusterConfig::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(3);
        }
    };
    let make_clerk = |_client: usize| {
        let options = ClerkOptions {
            timeout: args.timeout,
            client_token: config.client_token.clone(),
            ..ClerkOptions::default()
        };
        Clerk::new(&config, options)
    };
    let progress = |s: &loadgen::SecondStats| {
        eprintln!(
            "[{:>3}s] {:>8} ops/s  p50 {:>8.3} ms  p99 {:>8.3} ms  busy/s {:>6}  errors/s {:>4}",
            s.second, s.ops, s.p50_ms, s.p99_ms, s.busy, s.errors
        );
    };
    let report = loadgen::run(&args.load, &make_clerk, &progress);
    if let Some(path) = &args.plot {
        if let Err(e) = std::fs::write(path, report.to_svg()) {
            eprintln!("loadgen: cannot write the plot to {path}: {e}");
            return ExitCode::from(1);
        }
    }
    if args.json {
        println!("{}", report.to_json(&args.load));
    } else {
        print!("{}", report.to_text());
    }
    if report.check.as_deref().is_some_and(|c| c != "linearizable") {
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
