//! `chaos`: runs a cluster of real `kvserver` processes under a seeded
//! schedule of faults (kill -9, SIGSTOP, partitions, one-way loss, delay,
//! drop, fsync stalls) with concurrent clerks, then checks the history; or,
//! with `--check-history FILE`, checks a history written by an earlier run.
//! See the `chaos` module and the README's "Chaos testing" section.
//!
//! Exit status: 0 linearizable, no acknowledged append lost or duplicated,
//! and the cluster took a write soon after healing; 1 a violation (or a node
//! that died on its own); 2 an infrastructure failure (the cluster could not
//! be started, a file could not be written) or a checker that could not
//! decide in time; 3 bad arguments (one line on stderr).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use kvstore_raft::chaos::{self, report, ChaosOptions, FaultKind, Outcome};

const USAGE: &str = "usage: chaos [--nodes N] [--clients C] [--duration SECS] [--seed S] \
[--keys K] [--faults LIST] [--history FILE] [--work-dir DIR] [--kvserver PATH] \
[--check-timeout SECS] [--quiet] | chaos --check-history FILE [--check-timeout SECS]";
const EXIT_VIOLATION: u8 = 1;
const EXIT_INFRASTRUCTURE: u8 = 2;
const EXIT_USAGE: u8 = 3;
/// Bounds of the numeric options.
const MAX_NODES: u64 = 9;
const MAX_CLIENTS: u64 = 256;
const MAX_KEYS: usize = 64;
const MAX_DURATION_SECS: f64 = 24.0 * 3600.0;

enum Mode {
    Run(ChaosOptions),
    Check { history: PathBuf, timeout: Duration },
    Help,
}

fn options() -> getopts::Options {
    let mut opts = getopts::Options::new();
    opts.optopt("", "nodes", "cluster size, 3 to 9 (default 5)", "N");
    opts.optopt("", "clients", "concurrent clerks (default 8)", "C");
    opts.optopt(
        "",
        "duration",
        "seconds of faults and load (default 60)",
        "SECS",
    );
    opts.optopt(
        "",
        "seed",
        "seed of the fault schedule and the clients (default: from the clock, printed)",
        "S",
    );
    opts.optopt(
        "",
        "keys",
        "hot keys, half append keys, half registers (default 4)",
        "K",
    );
    let kinds: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
    let faults_help = format!(
        "comma-separated faults from {} or all (default all)",
        kinds.join(",")
    );
    opts.optopt("", "faults", &faults_help, "LIST");
    opts.optopt(
        "",
        "history",
        "where the history goes (default <tmp>/chaos-<seed>-history.jsonl)",
        "FILE",
    );
    opts.optopt(
        "",
        "work-dir",
        "cluster files, data and logs (default: a fresh temp dir, removed after a pass)",
        "DIR",
    );
    opts.optopt(
        "",
        "kvserver",
        "the kvserver binary (default: next to this one)",
        "PATH",
    );
    opts.optopt(
        "",
        "check-timeout",
        "how long the checker may search (default 120)",
        "SECS",
    );
    opts.optopt(
        "",
        "check-history",
        "check a history written by an earlier run, and exit",
        "FILE",
    );
    opts.optflag("", "quiet", "no progress lines on stderr");
    opts.optflag("h", "help", "print this help");
    opts
}

/// The value of `--name` parsed as `T` and within `[low, high]`, or `default`.
fn number<T>(
    matches: &getopts::Matches,
    name: &str,
    default: T,
    low: T,
    high: T,
) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    let Some(text) = matches.opt_str(name) else {
        return Ok(default);
    };
    let value: T = text
        .parse()
        .map_err(|_| format!("--{name} {text:?} is not a valid number"))?;
    if value >= low && value <= high {
        Ok(value)
    } else {
        Err(format!("--{name} {value} is not between {low} and {high}"))
    }
}

fn parse_args(argv: &[String]) -> Result<Mode, String> {
    let opts = options();
    let matches = opts.parse(argv).map_err(|e| e.to_string())?;
    if matches.opt_present("help") {
        println!("{}", opts.usage(USAGE));
        return Ok(Mode::Help);
    }
    if let Some(extra) = matches.free.first() {
        return Err(format!("unexpected argument {extra:?}"));
    }
    let check_secs = number(&matches, "check-timeout", 120.0, 0.001, MAX_DURATION_SECS)?;
    let check_timeout = Duration::from_secs_f64(check_secs);
    if let Some(history) = matches.opt_str("check-history") {
        return Ok(Mode::Check {
            history: PathBuf::from(history),
            timeout: check_timeout,
        });
    }
    let seed = match matches.opt_str("seed") {
        Some(_) => number(&matches, "seed", 0, 0, u64::MAX)?,
        None => clock_seed(),
    };
    let kvserver = match matches.opt_str("kvserver") {
        Some(path) => PathBuf::from(path),
        None => default_kvserver()?,
    };
    let mut options = ChaosOptions::new(seed, kvserver);
    options.nodes = number(&matches, "nodes", 5, 3, MAX_NODES)?;
    options.clients = number(&matches, "clients", 8, 1, MAX_CLIENTS)?;
    let duration_secs = number(&matches, "duration", 60.0, 1.0, MAX_DURATION_SECS)?;
    options.duration = Duration::from_secs_f64(duration_secs);
    options.keys = number(&matches, "keys", 4, 1, MAX_KEYS)?;
    if let Some(list) = matches.opt_str("faults") {
        options.faults = FaultKind::parse_list(&list)?;
    }
    if let Some(path) = matches.opt_str("history") {
        options.history = PathBuf::from(path);
    }
    options.work_dir = matches.opt_str("work-dir").map(PathBuf::from);
    options.check_timeout = check_timeout;
    options.verbose = !matches.opt_present("quiet");
    Ok(Mode::Run(options))
}

/// A seed from the clock, for runs that do not name one (it is printed).
fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs() ^ u64::from(d.subsec_micros()))
}

/// `kvserver` in the directory of this executable.
fn default_kvserver() -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    Ok(me.with_file_name("kvserver"))
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mode = match parse_args(&argv) {
        Ok(mode) => mode,
        Err(message) => {
            eprintln!("chaos: {message} ({USAGE})");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match mode {
        Mode::Help => ExitCode::SUCCESS,
        Mode::Check { history, timeout } => check_file(&history, timeout),
        Mode::Run(options) => run(&options),
    }
}

fn run(options: &ChaosOptions) -> ExitCode {
    // The seed first, so that even an aborted run can be replayed.
    println!("chaos: seed {}", options.seed);
    let report = match chaos::run(options) {
        Ok(report) => report,
        Err(message) => {
            eprintln!("chaos: {message}");
            println!("verdict: INFRASTRUCTURE FAILURE (seed {})", options.seed);
            return ExitCode::from(EXIT_INFRASTRUCTURE);
        }
    };
    print!("{}", report::run_text(&report));
    match report.outcome() {
        Outcome::Passed => ExitCode::SUCCESS,
        Outcome::Violation => ExitCode::from(EXIT_VIOLATION),
        Outcome::Undecided => ExitCode::from(EXIT_INFRASTRUCTURE),
    }
}

fn check_file(history: &std::path::Path, timeout: Duration) -> ExitCode {
    let verdict = match chaos::check_history_file(history, timeout) {
        Ok(verdict) => verdict,
        Err(message) => {
            eprintln!("chaos: {message}");
            return ExitCode::from(EXIT_INFRASTRUCTURE);
        }
    };
    print!("{}", report::verdict_text(&verdict, history));
    if verdict.passed() {
        println!("verdict: PASS");
        ExitCode::SUCCESS
    } else if verdict.violated() {
        println!("verdict: FAIL: violation found");
        ExitCode::from(EXIT_VIOLATION)
    } else {
        println!("verdict: UNDECIDED: the checker ran out of time");
        ExitCode::from(EXIT_INFRASTRUCTURE)
    }
}
