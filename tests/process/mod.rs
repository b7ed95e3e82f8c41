//! Real-process clusters for the multi-process tests: three `kvserver`
//! children on 127.0.0.1 with one temporary data directory per test, crashed
//! with SIGKILL and hung with SIGSTOP/SIGCONT; `clerk status --json` for the
//! cluster's view of itself; and `clerk shell --json` children as recorded
//! clients, whose operations (call and return times, a timeout recorded as an
//! unknown outcome) form the history given to the linearizability checker.
//!
//! Every child process belongs to a guard that kills it on drop, so a failing
//! (panicking) test leaves no process behind.
#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use kvstore_raft::check::{self, KvInput, KvOutput, Operation, Verdict};
use serde_json::Value;
use tempfile::TempDir;

// A binary with both `common` and `process` (tests/http.rs) loads this twice; the file
// locks keep the two copies from handing out the same port.
#[allow(clippy::duplicate_mod)]
#[path = "../ports/mod.rs"]
mod ports;
pub mod proxy;

pub use ports::free_ports;

pub const KVSERVER: &str = env!("CARGO_BIN_EXE_kvserver");
pub const CLERK: &str = env!("CARGO_BIN_EXE_clerk");
pub const LOADGEN: &str = env!("CARGO_BIN_EXE_loadgen");

/// The test timings: elections in 150-300 ms, heartbeats every 30 ms.
pub const TIMINGS_JSON: &str = r#""tick_ms":10,"election_timeout_min_ms":150,"election_timeout_max_ms":300,"heartbeat_interval_ms":30"#;
/// How often the wait loops poll the cluster's status.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long a shell's answer may take beyond its clerk's own deadline before
/// the test calls the clerk hung.
const ANSWER_GRACE: Duration = Duration::from_secs(15);
/// How long the checker may search one history.
const CHECK_TIMEOUT: Duration = Duration::from_secs(40);

/// Sends `signal` to the process `pid`.
fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) on a child we started and have not yet reaped.
    let result = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(result, 0, "kill({pid}, {signal}) failed");
}

/// Kills and reaps `child`; errors mean it has already exited and been
/// reaped, which is what is wanted.
fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// One node's view of itself, from `clerk status --json`; `None` fields when
/// it was unreachable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: u64,
    pub role: String,
    pub term: u64,
    pub leader: u64,
    pub commit: u64,
    pub applied: u64,
    pub snapshot_index: u64,
}

impl NodeStatus {
    pub fn reachable(&self) -> bool {
        self.role != "unreachable"
    }
}

fn parse_status(text: &str) -> Vec<NodeStatus> {
    let array: Vec<Value> = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("clerk status --json printed bad JSON ({e}): {text}"));
    array
        .iter()
        .map(|node| {
            let number = |key: &str| node[key].as_u64().unwrap_or(0);
            NodeStatus {
                id: number("id"),
                role: node["role"].as_str().unwrap_or("?").to_string(),
                term: number("term"),
                leader: number("leader"),
                commit: number("commit"),
                applied: number("applied"),
                snapshot_index: number("snapshot_index"),
            }
        })
        .collect()
}

/// The leader, when exactly one reachable node is leader and every
/// reachable node is at its term.
pub fn single_leader(statuses: &[NodeStatus]) -> Option<&NodeStatus> {
    let leaders: Vec<&NodeStatus> = statuses.iter().filter(|s| s.role == "leader").collect();
    match leaders[..] {
        [leader]
            if statuses
                .iter()
                .filter(|s| s.reachable())
                .all(|s| s.term == leader.term) =>
        {
            Some(leader)
        }
        _ => None,
    }
}

/// The common applied index, when every node is reachable and all agree on
/// commit and applied.
pub fn converged(statuses: &[NodeStatus]) -> Option<u64> {
    let first = statuses.first()?;
    statuses
        .iter()
        .all(|s| s.reachable() && s.commit == first.commit && s.applied == first.applied)
        .then_some(first.applied)
}

/// A cluster of `kvserver` processes; every node is killed on drop.
pub struct Cluster {
    pub name: String,
    pub dir: TempDir,
    pub config_path: PathBuf,
    pub ports: Vec<u16>,
    /// Each node's Redis-protocol port (`resp_port`), index `id - 1`.
    pub resp_ports: Vec<u16>,
    /// Index `id - 1`; `None` while the node is down.
    nodes: Vec<Option<Child>>,
    paused: Vec<bool>,
    /// True when every node runs with `--fault-file` (see `fault_file`).
    fault_files: bool,
    /// Per node (index `id - 1`), a cluster file of its own (see `start_behind_proxies`);
    /// empty: every node reads `config_path`.
    node_configs: Vec<PathBuf>,
}

impl Cluster {
    /// Starts `size` nodes with the test timings plus `extra_json` (more
    /// config keys, each followed by a comma, or "").
    pub fn start(name: &str, size: usize, extra_json: &str) -> Cluster {
        Cluster::start_with(name, size, extra_json, false)
    }

    /// Like `start`, with every node run with `--fault-file`, so a test can
    /// stall or fail its fsyncs by writing to `fault_file(id)`.
    pub fn start_with_fault_files(name: &str, size: usize, extra_json: &str) -> Cluster {
        Cluster::start_with(name, size, extra_json, true)
    }

    fn start_with(name: &str, size: usize, extra_json: &str, fault_files: bool) -> Cluster {
        let mut cluster = Cluster::build(name, size, extra_json, fault_files);
        for id in cluster.ids() {
            cluster.start_node(id);
        }
        cluster
    }

    /// Like `start`, with every node reaching every other through a loopback proxy the
    /// test controls (`Proxies::isolate`, `heal`): each node gets a cluster file of its own
    /// naming its peers by their proxies' ports. `config_path` (used by `clerk` and
    /// `status`) names the real ports, so the test itself always sees every node.
    pub fn start_behind_proxies(
        name: &str,
        size: usize,
        extra_json: &str,
    ) -> (Cluster, proxy::Proxies) {
        let mut cluster = Cluster::build(name, size, extra_json, false);
        let targets: Vec<(u64, std::net::SocketAddr)> = cluster
            .ids()
            .into_iter()
            .map(|id| {
                let port = cluster.ports[(id - 1) as usize];
                (id, std::net::SocketAddr::from(([127, 0, 0, 1], port)))
            })
            .collect();
        let proxies = proxy::Proxies::start(&targets, &free_ports(proxy::Proxies::links(size)));
        let text = fs::read_to_string(&cluster.config_path).expect("read the cluster file");
        for id in cluster.ids() {
            let mut config: Value = serde_json::from_str(&text).expect("the cluster file");
            for node in config["raft_nodes"].as_array_mut().expect("raft_nodes") {
                let other = node["id"].as_u64().expect("an id");
                if other != id {
                    node["port"] = proxies.port(id, other).into();
                }
            }
            let path = cluster.dir.path().join(format!("cluster-node{id}.json"));
            fs::write(&path, config.to_string()).expect("write a node's cluster file");
            cluster.node_configs.push(path);
        }
        for id in cluster.ids() {
            cluster.start_node(id);
        }
        (cluster, proxies)
    }

    fn build(name: &str, size: usize, extra_json: &str, fault_files: bool) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix(&format!("proc-{name}-"))
            .tempdir()
            .expect("create the test directory");
        let ports = free_ports(size);
        let resp_ports = free_ports(size);
        let nodes_json: Vec<String> = ports
            .iter()
            .zip(&resp_ports)
            .enumerate()
            .map(|(i, (port, resp))| {
                format!(
                    r#"{{"id":{},"ip":"127.0.0.1","port":{port},"resp_port":{resp}}}"#,
                    i + 1
                )
            })
            .collect();
        let config = format!(
            r#"{{"raft_nodes":[{}],"data_dir":{:?},{extra_json}{TIMINGS_JSON}}}"#,
            nodes_json.join(","),
            dir.path().join("data").display().to_string()
        );
        let config_path = dir.path().join("cluster.json");
        fs::write(&config_path, config).expect("write the cluster file");
        Cluster {
            name: name.to_string(),
            dir,
            config_path,
            ports,
            resp_ports,
            nodes: (0..size).map(|_| None).collect(),
            paused: vec![false; size],
            fault_files,
            node_configs: Vec::new(),
        }
    }

    pub fn ids(&self) -> Vec<u64> {
        (1..=self.nodes.len() as u64).collect()
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join("data").join(format!("node{id}"))
    }

    fn log_path(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node{id}.log"))
    }

    /// Node `id`'s whole stderr, over all its runs.
    pub fn log(&self, id: u64) -> String {
        fs::read_to_string(self.log_path(id)).unwrap_or_default()
    }

    /// Node `id`'s fault file (used by `start_with_fault_files` clusters): it
    /// does not exist until a test writes `stall` or `fail` into it.
    pub fn fault_file(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node{id}.fault"))
    }

    /// Starts node `id` (again) on its data directory; its stderr is
    /// appended to `node<id>.log`, so one file holds every run.
    pub fn start_node(&mut self, id: u64) {
        self.start_node_with(id, &[]);
    }

    /// `start_node` with more `kvserver` arguments (e.g. `--join`).
    pub fn start_node_with(&mut self, id: u64, extra_args: &[&str]) {
        let index = (id - 1) as usize;
        assert!(self.nodes[index].is_none(), "node {id} is already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))
            .expect("open the node log");
        let mut command = Command::new(KVSERVER);
        let config = self.node_configs.get(index).unwrap_or(&self.config_path);
        command
            .arg("--config")
            .arg(config)
            .arg("--id")
            .arg(id.to_string())
            .arg("--data-dir")
            .arg(self.data_dir(id));
        if self.fault_files {
            command.arg("--fault-file").arg(self.fault_file(id));
        }
        command.args(extra_args);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        die_with_parent(&mut command);
        let child = command.spawn().expect("spawn kvserver");
        self.nodes[index] = Some(child);
        self.paused[index] = false;
    }

    /// kill -9 node `id` and reap it.
    pub fn kill(&mut self, id: u64) {
        let index = (id - 1) as usize;
        let mut child = self.nodes[index]
            .take()
            .unwrap_or_else(|| panic!("node {id} is not running"));
        signal(child.id(), libc::SIGKILL);
        child.wait().expect("reap kvserver");
        self.paused[index] = false;
    }

    /// SIGSTOP: the node hangs with its sockets open.
    pub fn pause(&mut self, id: u64) {
        let index = (id - 1) as usize;
        let pid = self.nodes[index].as_ref().expect("node is running").id();
        signal(pid, libc::SIGSTOP);
        self.paused[index] = true;
    }

    pub fn resume(&mut self, id: u64) {
        let index = (id - 1) as usize;
        let pid = self.nodes[index].as_ref().expect("node is running").id();
        signal(pid, libc::SIGCONT);
        self.paused[index] = false;
    }

    /// Waits for node `id` to exit by itself and reaps it; fails the test
    /// after `deadline`.
    pub fn wait_exit(&mut self, id: u64, deadline: Duration) -> ExitStatus {
        let index = (id - 1) as usize;
        let start = Instant::now();
        loop {
            let child = self.nodes[index].as_mut().expect("node is running");
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.nodes[index] = None;
                return status;
            }
            if start.elapsed() > deadline {
                panic!(
                    "{}: node {id} still runs after {deadline:?}\n{}",
                    self.name,
                    self.logs()
                );
            }
            sleep(POLL_INTERVAL);
        }
    }

    /// Node `id`'s process id (for scripts that stop nodes by pid file).
    pub fn pid(&self, id: u64) -> u32 {
        self.nodes[(id - 1) as usize]
            .as_ref()
            .unwrap_or_else(|| panic!("node {id} is not running"))
            .id()
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.nodes[(id - 1) as usize].is_some()
    }

    /// The peak resident memory of node `id`'s process so far (`VmHWM`), if it runs.
    pub fn peak_rss_bytes(&self, id: u64) -> Option<u64> {
        let pid = self.nodes[(id - 1) as usize].as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    pub fn is_paused(&self, id: u64) -> bool {
        self.paused[(id - 1) as usize]
    }

    /// Fails the test if a node that should be running has exited.
    pub fn assert_alive(&mut self) {
        for index in 0..self.nodes.len() {
            let exited = match &mut self.nodes[index] {
                Some(child) => child.try_wait().expect("try_wait"),
                None => None,
            };
            if let Some(status) = exited {
                panic!(
                    "{}: node {} exited ({status})\n{}",
                    self.name,
                    index + 1,
                    self.logs()
                );
            }
        }
    }

    /// The last lines of every node's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        for id in self.ids() {
            let log = fs::read_to_string(self.log_path(id)).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            text.push_str(&format!(
                "--- node {id} (last lines)\n{}\n",
                tail.join("\n")
            ));
        }
        text
    }

    /// Runs `clerk --config F --timeout SECS ARGS...` to completion.
    pub fn clerk(&self, timeout_secs: f64, args: &[&str]) -> Output {
        let mut command = Command::new(CLERK);
        command
            .arg("--config")
            .arg(&self.config_path)
            .arg("--timeout")
            .arg(timeout_secs.to_string())
            .args(args)
            .stdin(Stdio::null());
        die_with_parent(&mut command);
        command.output().expect("run clerk")
    }

    /// Every node's status from `clerk status --json`.
    pub fn status(&self) -> Vec<NodeStatus> {
        let output = self.clerk(1.0, &["status", "--json"]);
        parse_status(&String::from_utf8_lossy(&output.stdout))
    }

    /// Polls the status until `ready` gives a value; fails the test (with
    /// the last status and the node logs) after `deadline`, or if a node
    /// that should run has exited.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        deadline: Duration,
        mut ready: impl FnMut(&[NodeStatus]) -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            self.assert_alive();
            let statuses = self.status();
            if let Some(value) = ready(&statuses) {
                return value;
            }
            if start.elapsed() > deadline {
                panic!(
                    "{}: {what}: not within {deadline:?}; last status {statuses:#?}\n{}",
                    self.name,
                    self.logs()
                );
            }
            sleep(POLL_INTERVAL);
        }
    }

    /// Waits for exactly one leader with every reachable node at its term;
    /// returns the leader's (id, term).
    pub fn wait_leader(&mut self, deadline: Duration) -> (u64, u64) {
        self.wait_for("one leader, all at its term", deadline, |statuses| {
            single_leader(statuses).map(|leader| (leader.id, leader.term))
        })
    }

    /// Waits until every node is reachable with the same commit and applied
    /// index; returns that index.
    pub fn wait_converged(&mut self, deadline: Duration) -> u64 {
        self.wait_for(
            "all nodes at the same commit and applied",
            deadline,
            converged,
        )
    }

    /// Starts a `clerk shell --json` child as recorded client `client`,
    /// its times counted from `epoch`.
    pub fn shell(&self, client: u64, timeout_secs: f64, epoch: Instant) -> Shell {
        Shell::start(&self.config_path, client, timeout_secs, epoch)
    }

    /// The bytes in node `id`'s WAL segments (`wal-*.log`).
    pub fn wal_bytes(&self, id: u64) -> u64 {
        fs::read_dir(self.data_dir(id))
            .expect("read the data directory")
            .map(|entry| entry.expect("directory entry"))
            .filter(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                name.starts_with("wal-") && name.ends_with(".log")
            })
            // Without the zeroes preallocated after the active segment's records (at most
            // 1 MiB, see `StorageOptions`): the bytes the log holds.
            .map(|entry| {
                let bytes = fs::read(entry.path()).expect("read a WAL segment");
                bytes
                    .iter()
                    .rposition(|&b| b != 0)
                    .map_or(0, |last| last as u64 + 1)
            })
            .sum()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too; no SIGCONT needed.
        for child in self.nodes.iter_mut().flatten() {
            kill_child(child);
        }
        if std::thread::panicking() {
            // Keep the logs and data directories of a failed test.
            self.dir.disable_cleanup(true);
            eprintln!("{}: kept {}", self.name, self.dir.path().display());
        }
    }
}

/// Asks the kernel to SIGKILL the child when the thread that spawned it
/// ends, so not even a killed test binary leaves servers behind. Every
/// spawn here happens on a thread that outlives the child's use.
pub fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// A `clerk shell --json` child: one clerk, so one client session. Each
/// call writes one JSON line and waits for its answer line.
pub struct Shell {
    child: Child,
    stdin: ChildStdin,
    answers: Receiver<String>,
    pub client: u64,
    epoch: Instant,
    answer_deadline: Duration,
}

impl Shell {
    pub fn start(config: &Path, client: u64, timeout_secs: f64, epoch: Instant) -> Shell {
        let mut command = Command::new(CLERK);
        command
            .arg("--config")
            .arg(config)
            .arg("--timeout")
            .arg(timeout_secs.to_string())
            .args(["shell", "--json"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        die_with_parent(&mut command);
        let mut child = command.spawn().expect("spawn clerk shell");
        let stdin = child.stdin.take().expect("shell stdin");
        let stdout = child.stdout.take().expect("shell stdout");
        // A reader thread, so that waiting for an answer is bounded in time.
        let (sender, answers) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        Shell {
            child,
            stdin,
            answers,
            client,
            epoch,
            answer_deadline: Duration::from_secs_f64(timeout_secs) + ANSWER_GRACE,
        }
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Runs one operation and returns it as recorded: with output and return
    /// time when the clerk answered, without (outcome unknown) when it timed
    /// out.
    pub fn call(&mut self, input: KvInput) -> Operation {
        let request = serde_json::to_string(&input).expect("serialize a request");
        let call_us = self.now_us();
        writeln!(self.stdin, "{request}")
            .and_then(|()| self.stdin.flush())
            .expect("write to clerk shell");
        let line = match self.answers.recv_timeout(self.answer_deadline) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => panic!(
                "client {}: clerk shell gave no answer to {request} within {:?}",
                self.client, self.answer_deadline
            ),
            Err(RecvTimeoutError::Disconnected) => {
                panic!(
                    "client {}: clerk shell exited during {request}",
                    self.client
                )
            }
        };
        let return_us = kvstore_raft::check::return_stamp_us(self.epoch);
        let output = parse_answer(&input, &line);
        Operation {
            client_id: self.client,
            input,
            call_us,
            return_us: output.as_ref().map(|_| return_us),
            output,
        }
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// The output an answer line reports, `None` for a timeout (outcome
/// unknown). Any other failure is a broken contract and fails the test.
fn parse_answer(input: &KvInput, line: &str) -> Option<KvOutput> {
    let answer: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("clerk shell answered bad JSON ({e}): {line}"));
    if answer["ok"] != Value::Bool(true) {
        assert_eq!(
            answer["error"], "timeout",
            "for {input:?} the clerk answered {line}"
        );
        return None;
    }
    let value = || answer["value"].as_str().map(str::to_string);
    let flag = |key: &str| {
        answer[key]
            .as_bool()
            .unwrap_or_else(|| panic!("for {input:?} the answer {line} lacks {key:?}"))
    };
    Some(match input {
        KvInput::Get { .. } => KvOutput::Get { value: value() },
        KvInput::Put { .. } => KvOutput::Put,
        KvInput::Append { .. } => KvOutput::Append,
        KvInput::Delete { .. } => KvOutput::Delete {
            existed: flag("existed"),
        },
        // The shell shows the value before the operation, null for a
        // missing key (which the model reads as "").
        KvInput::Cas { .. } => KvOutput::Cas {
            swapped: flag("swapped"),
            found: value().is_some(),
            current: Some(value().unwrap_or_default()),
        },
    })
}

pub fn get(key: &str) -> KvInput {
    KvInput::Get { key: key.into() }
}

pub fn put(key: &str, value: &str) -> KvInput {
    KvInput::Put {
        key: key.into(),
        value: value.into(),
    }
}

pub fn append(key: &str, value: &str) -> KvInput {
    KvInput::Append {
        key: key.into(),
        value: value.into(),
    }
}

/// Client `client`'s `j`-th append element (see `check_appends`).
pub fn element(client: u64, j: u64) -> String {
    format!("x {client} {j} y")
}

/// What one client did: its operations in order, and its acknowledged
/// appends per key.
#[derive(Default)]
pub struct Recorded {
    pub ops: Vec<Operation>,
    pub acked_appends: Vec<(String, u64, String)>,
}

impl Recorded {
    /// Runs `input` through `shell`, records it and returns its output.
    pub fn run(&mut self, shell: &mut Shell, input: KvInput) -> Option<KvOutput> {
        let op = shell.call(input);
        if let (KvInput::Append { key, value }, Some(_)) = (&op.input, &op.output) {
            self.acked_appends
                .push((key.clone(), shell.client, value.clone()));
        }
        let output = op.output.clone();
        self.ops.push(op);
        output
    }

    pub fn merge(&mut self, other: Recorded) {
        self.ops.extend(other.ops);
        self.acked_appends.extend(other.acked_appends);
    }

    pub fn known_ops(&self) -> usize {
        self.ops.iter().filter(|op| op.output.is_some()).count()
    }

    /// The acknowledged appends to `key`, per client in order.
    pub fn acked_for(&self, key: &str) -> Vec<(u64, String)> {
        self.acked_appends
            .iter()
            .filter(|(k, _, _)| k == key)
            .map(|(_, client, element)| (*client, element.clone()))
            .collect()
    }

    /// Asserts that `final_value` of `key` holds every acknowledged append
    /// to it exactly once, in each client's order.
    pub fn assert_appends(&self, key: &str, final_value: &str) {
        let acked = self.acked_for(key);
        if let Err(violation) = check::check_appends(final_value, &acked) {
            panic!(
                "key {key:?}: {violation} ({} acknowledged appends); value {final_value:?}",
                acked.len()
            );
        }
    }

    /// Asserts that the history is linearizable; a non-linearizable one is
    /// written to `history-<name>.jsonl` in the temp dir's parent, named in
    /// the failure.
    pub fn assert_linearizable(&self, name: &str) {
        let start = Instant::now();
        match check::check(&self.ops, CHECK_TIMEOUT) {
            Verdict::Linearizable => eprintln!(
                "{name}: {} operations linearizable (checked in {:?})",
                self.ops.len(),
                start.elapsed()
            ),
            Verdict::NotLinearizable { key, ops } => {
                let path = std::env::temp_dir().join(format!("history-{name}.jsonl"));
                let saved = File::create(&path)
                    .and_then(|file| check::write_history_jsonl(file, &self.ops))
                    .map(|()| format!("history saved to {}", path.display()))
                    .unwrap_or_else(|e| format!("history not saved: {e}"));
                panic!(
                    "{name}: not linearizable on key {key:?} ({saved}); failing prefix: {ops:#?}"
                );
            }
            Verdict::Timeout => panic!(
                "{name}: the checker could not decide {} operations within {CHECK_TIMEOUT:?}",
                self.ops.len()
            ),
        }
    }
}
