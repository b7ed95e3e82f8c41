//! The `loadgen` binary against a real 3-node cluster of `kvserver`
//! processes on loopback: a small closed-loop run with `--json --plot
//! --check` must print one JSON object with the fields compare.sh reads, a
//! linearizable verdict and an SVG plot with labelled axes and a legend; an
//! open-loop run must send what its schedule asks for; `--preload` must write
//! every key (with a progress line), and fail with one clear line when it
//! cannot (a time limit, no cluster); bad arguments must exit 3 with one
//! line. Every child process is killed when the test ends, even when it
//! fails.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use kvstore_raft::clerk::{Clerk, ClerkOptions};
use kvstore_raft::config::ClusterConfig;
use kvstore_raft::loadgen::MAX_CLIENTS_PER_CONNECTION;
use serde_json::Value;
use tempfile::TempDir;

#[path = "ports/mod.rs"]
mod ports;

const KVSERVER: &str = env!("CARGO_BIN_EXE_kvserver");
const LOADGEN: &str = env!("CARGO_BIN_EXE_loadgen");
/// How long the cluster may take to elect a leader and take a write.
const READY_DEADLINE: Duration = Duration::from_secs(20);
/// How long a loadgen run of a few seconds may take, check included.
const RUN_DEADLINE: Duration = Duration::from_secs(40);
const NODES: u64 = 3;

/// Three kvserver processes on loopback ports that were free a moment ago,
/// with short Raft timings and data in a temporary directory. Killed on drop.
struct Cluster {
    dir: TempDir,
    config: PathBuf,
    nodes: Vec<Child>,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let nodes: Vec<String> = ports::free_ports(NODES as usize)
            .into_iter()
            .enumerate()
            .map(|(i, port)| format!(r#"{{"id": {}, "ip": "127.0.0.1", "port": {port}}}"#, i + 1))
            .collect();
        let config = dir.path().join("cluster.json");
        let text = format!(
            r#"{{"raft_nodes": [{}], "data_dir": {:?}, "tick_ms": 10,
                "election_timeout_min_ms": 150, "election_timeout_max_ms": 300,
                "heartbeat_interval_ms": 30}}"#,
            nodes.join(", "),
            dir.path().join("data").display().to_string()
        );
        fs::write(&config, text).expect("write cluster.json");
        let mut cluster = Cluster {
            dir,
            config,
            nodes: Vec::new(),
        };
        for id in 1..=NODES {
            let log = File::create(cluster.dir.path().join(format!("node{id}.log"))).unwrap();
            let child = Command::new(KVSERVER)
                .arg("--config")
                .arg(&cluster.config)
                .args(["--id", &id.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn kvserver");
            cluster.nodes.push(child);
        }
        cluster.wait_ready();
        cluster
    }

    /// Waits until a write succeeds, i.e. a leader was elected.
    fn wait_ready(&mut self) {
        let config = ClusterConfig::load(&self.config).expect("load the config");
        let options = ClerkOptions {
            timeout: READY_DEADLINE,
            ..ClerkOptions::default()
        };
        let mut clerk = Clerk::new(&config, options);
        if let Err(e) = clerk.put(b"ready", b"1") {
            for (i, node) in self.nodes.iter_mut().enumerate() {
                if let Ok(Some(status)) = node.try_wait() {
                    panic!("node {} exited with {status}: {}", i + 1, self.log(i + 1));
                }
            }
            panic!("the cluster took no write within {READY_DEADLINE:?}: {e}");
        }
    }

    fn log(&self, id: usize) -> String {
        fs::read_to_string(self.dir.path().join(format!("node{id}.log"))).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
    }
}

/// What a loadgen process left behind.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs loadgen with `args` (stdout and stderr to files, so a full pipe can
/// never block it), killing it and failing past `RUN_DEADLINE`.
fn loadgen(dir: &Path, args: &[&str]) -> Run {
    let out_path = dir.join("loadgen.out");
    let err_path = dir.join("loadgen.err");
    let mut child = Command::new(LOADGEN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .expect("spawn loadgen");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if start.elapsed() > RUN_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "loadgen {args:?} ran past {RUN_DEADLINE:?}; stderr:\n{}",
                fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        sleep(Duration::from_millis(50));
    };
    Run {
        status,
        stdout: fs::read_to_string(&out_path).unwrap(),
        stderr: fs::read_to_string(&err_path).unwrap(),
    }
}

/// The last line of stdout, which must be one JSON object.
fn last_json(run: &Run) -> Value {
    let line = run.stdout.lines().last().expect("stdout has a line");
    let value: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("last stdout line is not JSON ({e}): {line}"));
    assert!(value.is_object(), "not an object: {line}");
    value
}

/// The text of every `<text>` element of an SVG document.
fn svg_texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|element| {
            let (_, rest) = element.split_once('>')?;
            let (text, _) = rest.split_once("</text>")?;
            Some(text.trim().to_string())
        })
        .collect()
}

fn number(json: &Value, field: &str) -> f64 {
    json[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} is not a number in {json}"))
}

#[test]
fn closed_and_open_loop_runs_report_json_plot_and_check() {
    let cluster = Cluster::start();
    let config = cluster.config.to_str().unwrap();
    let plot = cluster.dir.path().join("F.svg");
    let run = loadgen(
        cluster.dir.path(),
        &[
            "--config",
            config,
            "--clients",
            "4",
            "--duration",
            "2",
            "--keys",
            "50",
            "--read-ratio",
            "0.5",
            "--json",
            "--plot",
            plot.to_str().unwrap(),
            "--check",
        ],
    );
    assert_eq!(run.status.code(), Some(0), "stderr:\n{}", run.stderr);
    let json = last_json(&run);
    for field in [
        "ops_per_sec",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "p999_ms",
        "max_ms",
        "busy",
        "writes",
        "reads",
        "ops",
        "elapsed_s",
    ] {
        number(&json, field);
    }
    assert!(number(&json, "ops_per_sec") > 0.0, "{json}");
    let (p50, p90, p99) = (
        number(&json, "p50_ms"),
        number(&json, "p90_ms"),
        number(&json, "p99_ms"),
    );
    let (p999, max) = (number(&json, "p999_ms"), number(&json, "max_ms"));
    assert!(p50 > 0.0 && p50 <= p90 && p90 <= p99, "{json}");
    assert!(p99 <= p999 && p999 <= max, "{json}");
    assert!(json["errors"].is_object(), "errors by kind: {json}");
    assert_eq!(
        number(&json, "reads") + number(&json, "writes"),
        number(&json, "ops")
    );
    assert!(number(&json, "reads") > 0.0 && number(&json, "writes") > 0.0);
    let elapsed = number(&json, "elapsed_s");
    assert!((2.0..10.0).contains(&elapsed), "{json}");
    // The write acknowledgements cut the 2 s window into writes + 1 gaps:
    // the longest is at least their mean, and no longer than the window.
    let gap_ms = number(&json, "max_write_gap_ms");
    let mean_gap_ms = 2_000.0 / (number(&json, "writes") + 1.0);
    assert!(gap_ms >= mean_gap_ms && gap_ms <= 2_000.0, "{json}");
    assert!(number(&json, "max_write_gap_end_s") <= 2.0, "{json}");
    let gaps: Vec<f64> = json["write_gaps"]
        .as_array()
        .expect("write_gaps")
        .iter()
        .map(|gap| number(gap, "ms"))
        .collect();
    assert_eq!(gaps.first(), Some(&gap_ms), "{json}");
    assert!(
        gaps.windows(2).all(|w| w[0] >= w[1]),
        "longest first: {json}"
    );
    assert_eq!(json["check"], "linearizable", "{json}");
    assert!(
        number(&json, "checked_ops") >= number(&json, "ops"),
        "{json}"
    );
    assert_eq!(json["timeline"].as_array().map(Vec::len), Some(2), "{json}");
    // One progress line per second, on stderr.
    let progress = run.stderr.lines().filter(|l| l.contains("ops/s")).count();
    assert_eq!(progress, 2, "stderr:\n{}", run.stderr);

    let svg = fs::read_to_string(&plot).expect("the plot was written");
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
    assert!(svg.trim_end().ends_with("</svg>"));
    let texts = svg_texts(&svg);
    for label in [
        "successful operations per second",
        "latency (ms)",
        "time since the start of the measured run (s)",
        "count per second",
        "ops/s",
        "p50",
        "p99",
        "p99.9",
        "BUSY (retried)",
        "errors",
    ] {
        assert!(
            texts.iter().any(|t| t == label),
            "no {label:?} in {texts:?}"
        );
    }
    // The time axis has ticks (0, 1, 2 s), three times (one per panel).
    for tick in ["0", "1", "2"] {
        let count = texts.iter().filter(|t| *t == tick).count();
        assert!(count >= 3, "tick {tick:?} on {count} time axes: {texts:?}");
    }
    // One thick line per series, drawn and in its legend: ops/s, p50, p99,
    // p99.9, BUSY (each once more in the legend).
    for color in ["#1F77B4", "#2CA02C", "#FF7F0E", "#D62728", "#9467BD"] {
        let lines = svg
            .lines()
            .filter(|l| l.contains("<polyline") && l.contains(&format!("stroke=\"{color}\"")))
            .count();
        assert_eq!(lines, 2, "series {color}: {lines} lines");
    }

    // Open loop: 200 requests a second for 2 s are scheduled and sent,
    // whatever the latency; none is left unsent at this modest rate.
    let run = loadgen(
        cluster.dir.path(),
        &[
            "--config",
            config,
            "--clients",
            "4",
            "--duration",
            "2",
            "--keys",
            "50",
            "--rate",
            "200",
            "--json",
        ],
    );
    assert_eq!(run.status.code(), Some(0), "stderr:\n{}", run.stderr);
    let json = last_json(&run);
    assert_eq!(number(&json, "scheduled"), 400.0, "{json}");
    let errors: f64 = json["errors"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_f64().unwrap())
        .sum();
    let (ops, unsent) = (number(&json, "ops"), number(&json, "unsent"));
    assert_eq!(
        ops + errors + unsent,
        400.0,
        "every request accounted: {json}"
    );
    assert!(
        ops >= 360.0,
        "ops {ops} not close to rate x duration: {json}"
    );
    let rate = number(&json, "ops_per_sec");
    assert!((150.0..=205.0).contains(&rate), "{json}");
}

#[test]
fn bad_arguments_exit_3_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cluster.json");
    fs::write(
        &config,
        r#"{"raft_nodes": [{"id": 1, "ip": "127.0.0.1", "port": 9}]}"#,
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["--clients", "0", "--duration", "1"], "--clients 0"),
        (&["--clients", "2"], "--duration is required"),
        (&["--clients", "2", "--duration", "-1"], "--duration -1"),
        (&["--clients", "x", "--duration", "1"], "--clients \"x\""),
        (
            &["--clients", "2", "--duration", "1", "--read-ratio", "2"],
            "--read-ratio 2",
        ),
        (&["--clients", "2", "--duration", "1", "--frob"], "frob"),
    ];
    for (args, expected) in cases {
        let run = loadgen(dir.path(), &[&["--config", config], args].concat());
        assert_eq!(run.status.code(), Some(3), "{args:?}: {}", run.stderr);
        assert_eq!(run.stderr.lines().count(), 1, "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(expected), "{args:?}: {}", run.stderr);
        assert!(run.stdout.is_empty(), "{args:?}: {}", run.stdout);
    }
    let missing = dir.path().join("missing.json");
    let args = [
        "--config",
        missing.to_str().unwrap(),
        "--clients",
        "1",
        "--duration",
        "1",
    ];
    let run = loadgen(dir.path(), &args);
    assert_eq!(run.status.code(), Some(3), "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("missing.json"), "{}", run.stderr);
}

#[test]
fn preload_writes_every_key_reports_progress_and_stops_at_its_time_limit() {
    let cluster = Cluster::start();
    let config = cluster.config.to_str().unwrap();
    const KEYS: u64 = 3000;
    // More preload clients than fit on one connection: the preload opens
    // connections of its own.
    let preload_clients = (2 * MAX_CLIENTS_PER_CONNECTION + 10).to_string();
    let run = loadgen(
        cluster.dir.path(),
        &[
            "--config",
            config,
            "--clients",
            "4",
            "--keys",
            &KEYS.to_string(),
            "--value-size",
            "100",
            "--preload-only",
            "--preload-clients",
            &preload_clients,
            "--json",
        ],
    );
    assert_eq!(run.status.code(), Some(0), "stderr:\n{}", run.stderr);
    let json = last_json(&run);
    assert_eq!(number(&json, "preload_keys"), KEYS as f64, "{json}");
    assert_eq!(number(&json, "preload_errors"), 0.0, "{json}");
    assert!(json["preload_error"].is_null(), "{json}");
    assert_eq!(number(&json, "ops"), 0.0, "no measured run: {json}");
    let progress: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("[preload"))
        .collect();
    let last = progress.last().expect("a progress line");
    assert!(
        last.contains(&format!("{KEYS} / {KEYS} keys (100.0%)"))
            && last.contains("keys/s average")
            && last.contains("ETA"),
        "{last}"
    );
    // Every key is there, with a value of the asked size.
    let loaded = ClusterConfig::load(&cluster.config).unwrap();
    let mut clerk = Clerk::new(&loaded, ClerkOptions::default());
    for key in 0..KEYS {
        let value = clerk.get(format!("key{key:08}")).expect("get");
        let value = value.unwrap_or_else(|| panic!("key{key:08} was not preloaded"));
        assert_eq!(value.len(), 100, "key{key:08}");
    }

    // --preload then a measured mix: gets' and puts' latencies apart.
    let run = loadgen(
        cluster.dir.path(),
        &[
            "--config",
            config,
            "--clients",
            "4",
            "--keys",
            "500",
            "--preload",
            "--duration",
            "1",
            "--read-ratio",
            "0.5",
            "--json",
        ],
    );
    assert_eq!(run.status.code(), Some(0), "stderr:\n{}", run.stderr);
    let json = last_json(&run);
    assert_eq!(number(&json, "preload_keys"), 500.0, "{json}");
    assert!(number(&json, "ops") > 0.0, "{json}");
    for kind in ["read_latency", "write_latency"] {
        let latency = &json[kind];
        let (p50, p99, max) = (
            number(latency, "p50_ms"),
            number(latency, "p99_ms"),
            number(latency, "max_ms"),
        );
        assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{kind}: {json}");
        assert!(max <= number(&json, "max_ms"), "{kind}: {json}");
    }
    let combined_max =
        number(&json["read_latency"], "max_ms").max(number(&json["write_latency"], "max_ms"));
    assert_eq!(combined_max, number(&json, "max_ms"), "{json}");

    // A time limit far too short for the keys: the preload stops, says so
    // in one line, and no measured run follows.
    let run = loadgen(
        cluster.dir.path(),
        &[
            "--config",
            config,
            "--clients",
            "4",
            "--keys",
            "10000000",
            "--preload",
            "--preload-timeout",
            "0.5",
            "--duration",
            "30",
            "--json",
        ],
    );
    assert_eq!(run.status.code(), Some(1), "stderr:\n{}", run.stderr);
    let json = last_json(&run);
    let written = number(&json, "preload_keys");
    assert!(written < 10_000_000.0, "{json}");
    let reason = run.stderr.lines().last().unwrap();
    assert_eq!(
        reason,
        format!(
            "loadgen: preload failed: only {written} of 10000000 keys written within the \
             preload time limit of 0.5 s"
        ),
        "stderr:\n{}",
        run.stderr
    );
    assert_eq!(number(&json, "ops"), 0.0, "no measured run: {json}");
}

#[test]
fn a_preload_without_a_cluster_fails_at_its_first_lost_write_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on: every connect is refused.
    let port = ports::free_ports(1)[0];
    let config = dir.path().join("cluster.json");
    fs::write(
        &config,
        format!(r#"{{"raft_nodes": [{{"id": 1, "ip": "127.0.0.1", "port": {port}}}]}}"#),
    )
    .unwrap();
    let started = Instant::now();
    let run = loadgen(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--clients",
            "2",
            "--keys",
            "100000",
            "--preload",
            "--duration",
            "30",
            "--timeout",
            "1",
            "--json",
        ],
    );
    assert_eq!(run.status.code(), Some(1), "stderr:\n{}", run.stderr);
    // The first write lost after its 1 s deadline ends the preload: no
    // other key starts, and the 30 s run never begins.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    let reason = run.stderr.lines().last().unwrap();
    assert!(
        reason.starts_with("loadgen: preload failed: 0 of 100000 keys written in ")
            && reason.contains(", then writing key000"),
        "stderr:\n{}",
        run.stderr
    );
    let json = last_json(&run);
    assert!(number(&json, "preload_errors") >= 1.0, "{json}");
    assert_eq!(number(&json, "ops"), 0.0, "{json}");
}
