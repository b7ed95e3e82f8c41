//! The `clerk` binary against no cluster: a config whose nodes are loopback
//! ports nobody listens on. Checks the exit codes and the one-line messages a
//! user sees when the cluster is down, the command line is wrong, or the
//! config file is bad. Runs with a real cluster live in the lead's tests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "ports/mod.rs"]
mod ports;

const CLERK: &str = env!("CARGO_BIN_EXE_clerk");

/// Three loopback ports that were free a moment ago. Nothing listens on
/// them, so connecting is refused at once.
fn unused_ports() -> Vec<u16> {
    ports::free_ports(3)
}

/// A cluster file in `dir` for nodes 1..=3 on unused ports, plus `extra`
/// top-level JSON (starting with a comma).
fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let nodes: Vec<String> = unused_ports()
        .iter()
        .enumerate()
        .map(|(i, port)| format!(r#"{{"id": {}, "ip": "127.0.0.1", "port": {port}}}"#, i + 1))
        .collect();
    let path = dir.join("cluster.json");
    let text = format!(
        r#"{{"raft_nodes": [{}], "data_dir": "{}"{extra}}}"#,
        nodes.join(", "),
        dir.join("data").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn clerk(config: &Path, args: &[&str]) -> Output {
    clerk_with_input(config, args, "")
}

fn clerk_with_input(config: &Path, args: &[&str], input: &str) -> Output {
    let mut child = Command::new(CLERK)
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

/// The process's stderr, which must be exactly one line.
fn one_line(output: &Output) -> String {
    let stderr = stderr_of(output);
    assert_eq!(
        stderr.lines().count(),
        1,
        "stderr is not one line: {stderr:?}"
    );
    stderr
}

#[test]
fn an_operation_without_a_cluster_fails_after_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    for args in [["get", "k", ""], ["put", "k", "v"]] {
        let args: Vec<&str> = args.into_iter().filter(|a| !a.is_empty()).collect();
        let start = Instant::now();
        let output = clerk(&config, &[&["--timeout", "1"][..], &args].concat());
        let elapsed = start.elapsed();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = one_line(&output);
        assert!(stderr.contains("outcome is unknown"), "{stderr}");
        assert!(stderr.contains("127.0.0.1:"), "names a node: {stderr}");
        assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
        assert!(output.stdout.is_empty());
    }
}

#[test]
fn bad_usage_exits_3_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let cases: [(&[&str], &str); 4] = [
        (&["frobnicate", "k"], "unknown command \"frobnicate\""),
        (&["get"], "get takes KEY"),
        (&["--timeout", "soon", "get", "k"], "--timeout \"soon\""),
        (&["status", "--yaml"], "unexpected argument \"--yaml\""),
    ];
    for (args, expected) in cases {
        let output = clerk(&config, args);
        assert_eq!(output.status.code(), Some(3), "{args:?}");
        let stderr = one_line(&output);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    let output = Command::new(CLERK).arg("--help").output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("usage: clerk"));
}

#[test]
fn a_bad_config_exits_3_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), r#", "tick_msec": 5"#);
    let output = clerk(&config, &["get", "k"]);
    assert_eq!(output.status.code(), Some(3));
    let stderr = one_line(&output);
    assert!(stderr.contains("unknown key \"tick_msec\""), "{stderr}");
    assert!(stderr.contains("cluster.json"), "names the file: {stderr}");

    let missing = dir.path().join("missing.json");
    let output = clerk(&missing, &["get", "k"]);
    assert_eq!(output.status.code(), Some(3));
    assert!(one_line(&output).contains("missing.json: cannot read"));
}

#[test]
fn status_shows_every_node_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let output = clerk(&config, &["status", "--json"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(one_line(&output).contains("unreachable"));
    let nodes: Value = serde_json::from_slice(&output.stdout).unwrap();
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(node["id"], i as u64 + 1);
        assert_eq!(node["role"], "unreachable");
        assert!(node["addr"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(node["term"].is_null());
        assert!(!node["error"].as_str().unwrap().is_empty());
    }

    let output = clerk(&config, &["status"]);
    assert_eq!(output.status.code(), Some(2));
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        stdout.lines().count(),
        4,
        "a header and a line per node: {stdout}"
    );
    assert_eq!(stdout.matches("unreachable").count(), 3, "{stdout}");
}

#[test]
fn the_json_shell_answers_every_line_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let input = concat!(
        "{\"op\":\"get\"}\n",
        "not json\n",
        "\n",
        "{\"op\":\"put\",\"key\":\"k\",\"value\":\"v\"}\n",
    );
    let output = clerk_with_input(&config, &["--timeout", "0.3", "shell", "--json"], input);
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0]["error"], "bad_request");
    assert!(lines[0]["message"].as_str().unwrap().contains("key"));
    assert_eq!(lines[1]["error"], "bad_request");
    assert_eq!(lines[2]["ok"], false);
    assert_eq!(lines[2]["error"], "timeout");
    assert!(lines[2]["message"]
        .as_str()
        .unwrap()
        .contains("outcome is unknown"));
}

#[test]
fn the_plain_shell_reports_errors_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let input = "frob\nget\nput \"k\n\nquit\nget k\n";
    let output = clerk_with_input(&config, &["--timeout", "0.3", "shell"], input);
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        vec![
            "error: unknown command \"frob\" (try help)",
            "error: get takes KEY (0 arguments given) (try help)",
            "error: a quoted word is not closed",
        ],
        "no prompt when stdin is not a terminal, and nothing after quit"
    );
}
