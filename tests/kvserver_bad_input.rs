//! Real-process tests of the `kvserver` binary for every failure a user can
//! cause: a malformed cluster file, a wrong or missing argument, a port in
//! use, a data directory another node holds, and a damaged WAL. Each fatal
//! case must end within a bounded time with a non-zero status (2 for usage
//! and configuration mistakes, 1 for failures at run time) and one line on
//! stderr that names what is wrong; a damaged WAL must be left exactly as it
//! was found. A torn last record is the one damage that is not fatal: the
//! node cuts it off and serves what was acknowledged before it.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use kvstore_raft::proto::kvstore::*;
use kvstore_raft::rpc::services::KvStoreStub;
use kvstore_raft::rpc::{ClientConfig, RpcClient};
use tempfile::TempDir;

#[path = "ports/mod.rs"]
mod ports;

const KVSERVER: &str = env!("CARGO_BIN_EXE_kvserver");
/// How long a failing kvserver may take to exit; generous, since a clean
/// failure takes milliseconds and a hang is what this bounds.
const EXIT_DEADLINE: Duration = Duration::from_secs(10);
/// How long a single-node cluster may take to elect itself and answer.
const READY_DEADLINE: Duration = Duration::from_secs(10);
const EXIT_USAGE: i32 = 2;
const EXIT_RUNTIME: i32 = 1;
const SEGMENT_1: &str = "wal-00000000000000000001.log";

/// A port that was free a moment ago, claimed for this process (see `ports`).
fn free_port() -> u16 {
    ports::free_ports(1)[0]
}

/// A valid single-node cluster file body with short timings, node 1 on `port`.
fn cluster_json(port: u16, data_dir: &Path) -> String {
    format!(
        r#"{{"raft_nodes":[{{"id":1,"ip":"127.0.0.1","port":{port}}}],"data_dir":{:?},"tick_ms":10,"election_timeout_min_ms":150,"election_timeout_max_ms":300,"heartbeat_interval_ms":30}}"#,
        data_dir.display().to_string()
    )
}

fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).expect("write test file");
    path
}

/// Starts kvserver with `args`; its stderr goes to `stderr_path` (a file
/// cannot fill up and block the server the way an unread pipe could).
fn spawn(args: &[&str], stderr_path: &Path) -> Child {
    Command::new(KVSERVER)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(stderr_path).expect("create stderr file"))
        .spawn()
        .expect("spawn kvserver")
}

/// Waits until `child` exits; kills it and fails the test past `deadline`.
fn wait_exit(child: &mut Child, deadline: Duration, what: &str) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: kvserver did not exit within {deadline:?}");
        }
        sleep(Duration::from_millis(20));
    }
}

/// Runs kvserver with `args` in `dir`, expecting it to fail with `code` and
/// exactly one `kvserver:` line on stderr that contains every needle.
/// Returns that line.
fn expect_failure(dir: &Path, args: &[&str], code: i32, needles: &[&str]) -> String {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    let stderr_path = dir.join(format!("failure-{run}.stderr"));
    let mut child = spawn(args, &stderr_path);
    let status = wait_exit(&mut child, EXIT_DEADLINE, &format!("{args:?}"));
    let stderr = fs::read_to_string(&stderr_path).expect("read stderr");
    assert_eq!(
        status.code(),
        Some(code),
        "kvserver {args:?}: wrong exit status; stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "kvserver {args:?} panicked:\n{stderr}"
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("kvserver:"))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "kvserver {args:?}: want one error line; stderr:\n{stderr}"
    );
    for needle in needles {
        assert!(
            errors[0].contains(needle),
            "kvserver {args:?}: error line lacks {needle:?}: {}",
            errors[0]
        );
    }
    errors[0].to_string()
}

/// Every file under `dir` (recursively) with its bytes.
fn dir_contents(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in fs::read_dir(&current).expect("read_dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let bytes = fs::read(&path).expect("read data file");
                files.insert(path, bytes);
            }
        }
    }
    files
}

/// A running kvserver; killed on drop so a failing test leaves no process.
struct Server {
    child: Child,
    stderr_path: PathBuf,
    addr: SocketAddr,
}

impl Server {
    fn start(config: &Path, data_dir: &Path, port: u16, stderr_path: PathBuf) -> Server {
        let args = [
            "--config",
            config.to_str().unwrap(),
            "--id",
            "1",
            "--data-dir",
            data_dir.to_str().unwrap(),
        ];
        Server {
            child: spawn(&args, &stderr_path),
            stderr_path,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn stub(&self) -> KvStoreStub<RpcClient> {
        let config = ClientConfig {
            connect_timeout_ms: 500,
            call_timeout_ms: 2_000,
            ..ClientConfig::default()
        };
        KvStoreStub::new(RpcClient::new(self.addr, config))
    }

    /// Fails the test if the server has exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!("kvserver exited ({status}):\n{}", self.stderr());
        }
    }

    /// Retries `call` (same request, so the same client_id and seq) until the
    /// node answers OK: it may still be starting or electing itself.
    fn until_ok<R>(&mut self, what: &str, call: impl Fn() -> Option<R>) -> R {
        let start = Instant::now();
        loop {
            self.assert_running();
            if let Some(reply) = call() {
                return reply;
            }
            assert!(
                start.elapsed() < READY_DEADLINE,
                "{what}: no OK answer within {READY_DEADLINE:?}; stderr:\n{}",
                self.stderr()
            );
            sleep(Duration::from_millis(50));
        }
    }

    /// A session of this server's (opened through its log; bounded retries).
    fn open_session(&mut self) -> (u64, u64) {
        let stub = self.stub();
        let reply = self.until_ok("open a session", || {
            stub.open_session(&OpenSessionRequest::default())
                .ok()
                .filter(|reply| is_ok(&reply.header))
        });
        (reply.client_id, reply.session_secret)
    }

    fn put(&mut self, seq: u64, key: &str, value: &str) {
        let session = self.open_session();
        let stub = self.stub();
        let mut request = PutRequest {
            header: header(seq),
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            ..Default::default()
        };
        let header = request.header.mut_or_insert_default();
        (header.client_id, header.session_secret) = session;
        self.until_ok(&format!("put {key}"), || {
            stub.put(&request).ok().filter(|reply| is_ok(&reply.header))
        });
    }

    fn get(&mut self, seq: u64, key: &str) -> Option<String> {
        let stub = self.stub();
        let request = GetRequest {
            header: header(seq),
            key: key.as_bytes().to_vec(),
            ..Default::default()
        };
        let reply = self.until_ok(&format!("get {key}"), || {
            stub.get(&request).ok().filter(|reply| is_ok(&reply.header))
        });
        reply
            .found
            .then(|| String::from_utf8(reply.value).expect("utf-8 value"))
    }

    /// Sends SIGTERM and expects a clean exit (status 0) in time.
    fn stop(mut self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits");
        // SAFETY: kill(2) on our own child's pid; it has not been reaped yet.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "kill");
        let status = wait_exit(&mut self.child, EXIT_DEADLINE, "stop on SIGTERM");
        assert!(
            status.success(),
            "SIGTERM: exit {status}; stderr:\n{}",
            self.stderr()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

const CLIENT_ID: u64 = 77;

fn header(seq: u64) -> protobuf::MessageField<RequestHeader> {
    protobuf::MessageField::some(RequestHeader {
        client_id: CLIENT_ID,
        seq,
        ..Default::default()
    })
}

fn is_ok(header: &protobuf::MessageField<ReplyHeader>) -> bool {
    header.error.enum_value() == Ok(ErrorCode::OK)
}

/// A temp dir with a valid cluster file `ok.json` for node 1 on a free port.
struct Setup {
    tmp: TempDir,
    port: u16,
    config: PathBuf,
    data_dir: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let data_dir = tmp.path().join("data").join("node1");
        let config = write_file(tmp.path(), "ok.json", &cluster_json(port, &data_dir));
        Setup {
            tmp,
            port,
            config,
            data_dir,
        }
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    fn start(&self, name: &str) -> Server {
        let stderr_path = self.dir().join(format!("{name}.stderr"));
        Server::start(&self.config, &self.data_dir, self.port, stderr_path)
    }

    /// Runs the node once, writes a=1 and b=2 through it, and stops it with
    /// SIGTERM; returns the path of its (single) WAL segment.
    fn write_state(&self) -> PathBuf {
        let mut server = self.start("first-run");
        server.put(1, "a", "1");
        server.put(2, "b", "2");
        server.stop();
        let segment = self.data_dir.join(SEGMENT_1);
        assert!(segment.is_file(), "{} was not written", segment.display());
        segment
    }
}

fn config_error(text: &str, needles: &[&str]) {
    let setup = Setup::new();
    let config = write_file(setup.dir(), "bad.json", text);
    let config = config.to_str().unwrap();
    let mut all = vec![config];
    all.extend_from_slice(needles);
    expect_failure(
        setup.dir(),
        &["--config", config, "--id", "1"],
        EXIT_USAGE,
        &all,
    );
    assert!(
        !setup.data_dir.exists(),
        "a bad config must not create the data directory"
    );
}

#[test]
fn config_that_is_not_json() {
    config_error(r#"{"raft_nodes": [{"id": 1,"#, &["not valid JSON"]);
}

#[test]
fn config_with_an_unknown_key() {
    let setup = Setup::new();
    let text = cluster_json(setup.port, &setup.data_dir).replace(
        r#""tick_ms":10"#,
        r#""tick_ms":10,"election_timeout_ms":100"#,
    );
    config_error(&text, &[r#"unknown key "election_timeout_ms""#]);
}

#[test]
fn config_with_a_bad_port() {
    config_error(
        r#"{"raft_nodes":[{"id":1,"ip":"127.0.0.1","port":70000}]}"#,
        &["raft_nodes[0].port", "70000"],
    );
}

#[test]
fn config_without_raft_nodes() {
    config_error(r#"{"data_dir":"data"}"#, &[r#"missing key "raft_nodes""#]);
}

#[test]
fn config_file_that_does_not_exist() {
    config_error_path("/nonexistent/cluster.json", &["cannot read"]);
}

fn config_error_path(path: &str, needles: &[&str]) {
    let setup = Setup::new();
    let mut all = vec![path];
    all.extend_from_slice(needles);
    expect_failure(
        setup.dir(),
        &["--config", path, "--id", "1"],
        EXIT_USAGE,
        &all,
    );
}

#[test]
fn id_that_is_not_in_the_config() {
    let setup = Setup::new();
    let config = setup.config.to_str().unwrap();
    expect_failure(
        setup.dir(),
        &["--config", config, "--id", "9"],
        EXIT_USAGE,
        &[config, "9", "not in the config"],
    );
    assert!(!setup.data_dir.exists(), "an unknown id must touch nothing");
}

#[test]
fn bad_command_lines() {
    let setup = Setup::new();
    let config = setup.config.to_str().unwrap();
    let cases: [(&[&str], &[&str]); 5] = [
        (&["--id", "1"], &["--config is required"]),
        (&["--config", config], &["--id is required"]),
        (&["--config", config, "--id", "one"], &["--id", "\"one\""]),
        (
            &["--config", config, "--id", "1", "--log-level", "loud"],
            &["--log-level", "\"loud\""],
        ),
        (&["--config", config, "--id", "1", "extra"], &["\"extra\""]),
    ];
    for (args, needles) in cases {
        expect_failure(setup.dir(), args, EXIT_USAGE, needles);
    }
    assert!(
        !setup.data_dir.exists(),
        "a bad command line must touch nothing"
    );
}

#[test]
fn port_already_in_use() {
    let setup = Setup::new();
    let holder = TcpListener::bind(("127.0.0.1", setup.port)).expect("hold the port");
    let config = setup.config.to_str().unwrap();
    let addr = format!("127.0.0.1:{}", setup.port);
    let line = expect_failure(
        setup.dir(),
        &["--config", config, "--id", "1"],
        EXIT_RUNTIME,
        &[&addr, "in use"],
    );
    assert_eq!(
        line.matches(&addr).count(),
        1,
        "the address is named once: {line}"
    );
    drop(holder);
    assert!(
        !setup.data_dir.exists(),
        "a port in use must not create or touch the data directory"
    );
}

#[test]
fn data_directory_locked_by_another_kvserver() {
    let setup = Setup::new();
    let mut first = setup.start("holder");
    first.put(1, "a", "1");
    // The same node and data directory on another port: only the lock can
    // stop this one, not the port.
    let other_port = free_port();
    let other = write_file(
        setup.dir(),
        "other-port.json",
        &cluster_json(other_port, &setup.data_dir),
    );
    let data_dir = setup.data_dir.to_str().unwrap();
    expect_failure(
        setup.dir(),
        &[
            "--config",
            other.to_str().unwrap(),
            "--id",
            "1",
            "--data-dir",
            data_dir,
        ],
        EXIT_RUNTIME,
        &[data_dir, "locked"],
    );
    // The holder is unharmed and still serves.
    first.assert_running();
    assert_eq!(first.get(2, "a").as_deref(), Some("1"));
    first.stop();
}

#[test]
fn flipped_byte_in_an_early_wal_record() {
    let setup = Setup::new();
    let segment = setup.write_state();
    let mut bytes = fs::read(&segment).unwrap();
    // Offset 12 is inside the body of the first record (its header is 8
    // bytes), and several intact records follow it.
    bytes[12] ^= 0x40;
    fs::write(&segment, &bytes).unwrap();
    let before = dir_contents(&setup.data_dir);
    let config = setup.config.to_str().unwrap();
    let data_dir = setup.data_dir.to_str().unwrap();
    expect_failure(
        setup.dir(),
        &["--config", config, "--id", "1", "--data-dir", data_dir],
        EXIT_RUNTIME,
        &["corrupt", segment.to_str().unwrap(), "offset 0", "checksum"],
    );
    let after = dir_contents(&setup.data_dir);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "no file may be created or removed"
    );
    assert!(before == after, "no data file may be modified");
}

#[test]
fn truncated_last_record_is_cut_and_earlier_data_served() {
    let setup = Setup::new();
    let segment = setup.write_state();
    // The records end before the zeroes the WAL preallocates after them.
    let bytes = fs::read(&segment).unwrap();
    let records_bytes = bytes.iter().rposition(|&b| b != 0).unwrap() as u64 + 1;
    let cut_bytes = records_bytes - 3;
    File::options()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(cut_bytes)
        .unwrap();
    let mut server = setup.start("after-cut");
    assert_eq!(server.get(10, "a").as_deref(), Some("1"));
    let stderr = server.stderr();
    assert!(
        stderr.contains(SEGMENT_1) && stderr.contains("torn"),
        "the cut is logged, naming the file:\n{stderr}"
    );
    // The torn record is gone, back to the end of the last intact record.
    assert!(fs::metadata(&segment).unwrap().len() < cut_bytes);
    // The node keeps working: new writes are accepted and readable.
    server.put(11, "c", "3");
    assert_eq!(server.get(12, "c").as_deref(), Some("3"));
    server.stop();
}
