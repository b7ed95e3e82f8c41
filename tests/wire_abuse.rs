//! Wire abuse against a real `kvserver` process (issue 5, item 4): garbage
//! bytes, truncated frames (closed, then held open), a length prefix of
//! 4 GiB - 1, frames announced just under the limit and never sent, as many
//! idle connections as the fd limit allows (beyond `max_connections`), and
//! slow writers trickling a byte at a time. Throughout, a normal clerk keeps
//! working in parallel, the process stays up, and its resident memory
//! (VmRSS from /proc) stays under its baseline plus [`RSS_SLACK_BYTES`].
//!
//! One node, short `idle_timeout_ms` and `frame_timeout_ms` so that the
//! server's own timeouts close what the test leaves open. Every loop is
//! bounded in count and time; the checks wait with generous deadlines, so a
//! busy machine slows the test down without failing it.

mod process;

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{sleep, JoinHandle};
use std::time::{Duration, Instant};

use kvstore_raft::clerk::{Clerk, ClerkOptions};
use kvstore_raft::config::ClusterConfig;
use kvstore_raft::rpc::frame::{encode_frame, FrameHeader};
use kvstore_raft::rpc::handshake::{self, Credentials};
use kvstore_raft::rpc::services::kv_store;
use protobuf::Message;

/// The server's connection limit in this test.
const MAX_CONNECTIONS: usize = 512;
const IDLE_TIMEOUT_MS: u64 = 4_000;
const FRAME_TIMEOUT_MS: u64 = 2_000;
const MAX_FRAME_BYTES: usize = 16 << 20;
/// Idle connections opened at most (fewer when the fd limit is lower).
const MAX_IDLE_CONNECTIONS: usize = 4_000;
/// Resident memory may grow at most this much over the baseline.
const RSS_SLACK_BYTES: u64 = 64 << 20;
/// How long the server may take to close what it must close, beyond its
/// own timeout: generous, for a loaded machine.
const CLOSE_SLACK: Duration = Duration::from_secs(8);
/// How long the clerk may go without a successful operation.
const CLERK_STALL: Duration = Duration::from_secs(15);

/// The `kvserver` child; killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
    log_path: std::path::PathBuf,
}

impl Server {
    fn start(dir: &Path) -> (Server, ClusterConfig) {
        let port = process::free_ports(1)[0];
        let text = format!(
            r#"{{"raft_nodes":[{{"id":1,"ip":"127.0.0.1","port":{port}}}],"data_dir":{:?},
            "max_connections":{MAX_CONNECTIONS},"idle_timeout_ms":{IDLE_TIMEOUT_MS},
            "frame_timeout_ms":{FRAME_TIMEOUT_MS},"max_frame_bytes":{MAX_FRAME_BYTES},
            {}}}"#,
            dir.join("data").display().to_string(),
            process::TIMINGS_JSON
        );
        let config_path = dir.join("cluster.json");
        fs::write(&config_path, &text).unwrap();
        let config = ClusterConfig::parse(&text, "wire_abuse").expect("valid config");
        let log_path = dir.join("node1.log");
        let log = fs::File::create(&log_path).unwrap();
        let mut command = Command::new(process::KVSERVER);
        command
            .arg("--config")
            .arg(&config_path)
            .arg("--id")
            .arg("1")
            .arg("--log-level")
            .arg("warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn().expect("spawn kvserver");
        let addr = config.addr(1).unwrap();
        (
            Server {
                child,
                addr,
                log_path,
            },
            config,
        )
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails the test when the server has exited.
    fn assert_up(&mut self, during: &str) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            let log = fs::read_to_string(&self.log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            panic!("kvserver exited ({status}) during {during}; log tail:\n{tail:?}");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// VmRSS in bytes, from the text of /proc/PID/status.
fn parse_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// VmRSS of `pid` in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    parse_rss(&status).expect("VmRSS in /proc status")
}

/// Samples the server's RSS every 50 ms and keeps the maximum since the
/// last `take_max`.
struct RssWatch {
    max_bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RssWatch {
    fn start(pid: u32) -> RssWatch {
        let max_bytes = Arc::new(AtomicU64::new(rss_bytes(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let (max, stopped) = (Arc::clone(&max_bytes), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                // The process may be gone; the test itself notices that.
                let status = fs::read_to_string(format!("/proc/{pid}/status"));
                match status.ok().as_deref().and_then(parse_rss) {
                    Some(bytes) => {
                        max.fetch_max(bytes, Ordering::SeqCst);
                    }
                    None => return,
                }
                sleep(Duration::from_millis(50));
            }
        });
        RssWatch {
            max_bytes,
            stop,
            thread: Some(thread),
        }
    }

    /// The largest RSS seen since the last call; starts the next window.
    fn take_max(&self, pid: u32) -> u64 {
        let now = rss_bytes(pid);
        self.max_bytes.swap(now, Ordering::SeqCst).max(now)
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A clerk writing and reading one key in a loop on its own thread; counts
/// its successes and keeps its failures.
struct BackgroundClerk {
    ok_ops: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl BackgroundClerk {
    fn start(config: &ClusterConfig) -> BackgroundClerk {
        let options = ClerkOptions {
            timeout: Duration::from_secs(10),
            ..ClerkOptions::default()
        };
        let mut clerk = Clerk::new(config, options);
        let ok_ops = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed, stopped) = (
            Arc::clone(&ok_ops),
            Arc::clone(&failures),
            Arc::clone(&stop),
        );
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !stopped.load(Ordering::SeqCst) {
                n += 1;
                let value = format!("v{n}");
                let result = clerk
                    .put("abuse-clerk", &value)
                    .and_then(|()| clerk.get("abuse-clerk"));
                match result {
                    Ok(Some(got)) if got == value.as_bytes() => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(other) => failed
                        .lock()
                        .unwrap()
                        .push(format!("read {other:?} after writing {value}")),
                    Err(e) => failed.lock().unwrap().push(e.to_string()),
                }
                sleep(Duration::from_millis(10));
            }
        });
        BackgroundClerk {
            ok_ops,
            failures,
            stop,
            thread: Some(thread),
        }
    }

    fn ok_ops(&self) -> u64 {
        self.ok_ops.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until the clerk has completed `count` more operations
    /// than `since`, and fails the test if it does not or if any failed.
    fn assert_progress(&self, since: u64, count: u64, during: &str) {
        let deadline = Instant::now() + CLERK_STALL;
        while self.ok_ops() < since + count {
            assert!(
                Instant::now() < deadline,
                "the clerk made {} operations in {CLERK_STALL:?} during {during}",
                self.ok_ops() - since
            );
            sleep(Duration::from_millis(20));
        }
        let failures = self.failures.lock().unwrap();
        assert!(
            failures.is_empty(),
            "the clerk failed during {during}: {failures:?}"
        );
    }
}

impl Drop for BackgroundClerk {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A bare TCP connection: what a flood of idle connections opens.
fn connect_raw(addr: SocketAddr) -> Option<TcpStream> {
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()
}

/// A connection past the clerk handshake, so that the abuse that follows
/// reaches the frame decoder and not only the handshake's own reader.
fn connect(addr: SocketAddr) -> Option<TcpStream> {
    let stream = connect_raw(addr)?;
    handshake::connect(&stream, &Credentials::default(), 5_000).ok()?;
    stream.set_read_timeout(None).ok()?;
    stream.set_write_timeout(None).ok()?;
    Some(stream)
}

/// Whether the server has closed `stream` (reads end or fail), waiting at
/// most `wait` for it to happen; data the server sends first is skipped.
fn closed_within(mut stream: &TcpStream, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    let mut sink = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream
            .set_read_timeout(Some(left.min(Duration::from_millis(200))))
            .unwrap();
        match stream.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return true,
        }
    }
}

/// Whether the server has already closed `stream`, without waiting.
fn closed_now(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let closed = match stream.peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    };
    stream.set_nonblocking(false).unwrap();
    closed
}

/// A deterministic byte source (xorshift), so every run sends the same.
struct Bytes(u64);

impl Bytes {
    fn next(&mut self) -> u8 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 24) as u8
    }

    fn fill(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next()).collect()
    }
}

/// A valid Put request frame.
fn put_frame(key: &str, value_bytes: usize) -> Vec<u8> {
    let request = kvstore_raft::proto::kvstore::PutRequest {
        header: protobuf::MessageField::some(kvstore_raft::proto::kvstore::RequestHeader {
            client_id: 0xabcdef,
            seq: 1,
            ..Default::default()
        }),
        key: key.as_bytes().to_vec(),
        value: vec![b'x'; value_bytes],
        ..Default::default()
    };
    let body = request.write_to_bytes().unwrap();
    let mut frame = Vec::new();
    let header = FrameHeader::request(kv_store::SERVICE_ID, kv_store::PUT, 9);
    encode_frame(&mut frame, &header, "", &body, usize::MAX).unwrap();
    frame
}

/// Raises the soft limit on open files to the hard limit (libc is already a
/// dependency), and returns the soft limit now in force. The server, spawned
/// after this, inherits it.
fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, initialized struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// What one phase saw, for the record printed at the end.
struct PhaseReport {
    name: &'static str,
    max_rss_bytes: u64,
    note: String,
}

struct Abuse {
    server: Server,
    rss: RssWatch,
    clerk: BackgroundClerk,
    baseline_rss_bytes: u64,
    reports: Vec<PhaseReport>,
}

impl Abuse {
    /// Ends a phase: the server is up, the clerk made progress during it,
    /// and the RSS stayed under the bound.
    fn end_phase(&mut self, name: &'static str, clerk_before: u64, note: String) {
        self.server.assert_up(name);
        self.clerk.assert_progress(clerk_before, 3, name);
        let max_rss_bytes = self.rss.take_max(self.server.pid());
        assert!(
            max_rss_bytes <= self.baseline_rss_bytes + RSS_SLACK_BYTES,
            "{name}: RSS reached {} MiB, over the baseline {} MiB + {} MiB",
            max_rss_bytes >> 20,
            self.baseline_rss_bytes >> 20,
            RSS_SLACK_BYTES >> 20
        );
        eprintln!(
            "phase {name}: max RSS {:.1} MiB; clerk ops so far {}; {note}",
            max_rss_bytes as f64 / (1 << 20) as f64,
            self.clerk.ok_ops()
        );
        self.reports.push(PhaseReport {
            name,
            max_rss_bytes,
            note,
        });
    }

    fn addr(&self) -> SocketAddr {
        self.server.addr
    }
}

/// Garbage: random bytes then close; random bytes then wait for the server
/// to close (a random length prefix may announce more than is sent, so the
/// frame timeout is what closes some of them).
fn garbage(abuse: &mut Abuse) {
    let before = abuse.clerk.ok_ops();
    let mut bytes = Bytes(0x9e37_79b9_7f4a_7c15);
    let mut sent_and_closed = 0;
    for k in 0..200 {
        let Some(mut stream) = connect(abuse.addr()) else {
            continue;
        };
        let len = 1 + (k * 37) % 3000;
        // The server may close first; what it has read is the point.
        let _ = stream.write_all(&bytes.fill(len));
        sent_and_closed += 1;
    }
    let mut held: Vec<TcpStream> = Vec::new();
    for k in 0..50 {
        if let Some(mut stream) = connect(abuse.addr()) {
            let _ = stream.write_all(&bytes.fill(8 + k * 11));
            held.push(stream);
        }
    }
    let wait = Duration::from_millis(IDLE_TIMEOUT_MS.max(FRAME_TIMEOUT_MS)) + CLOSE_SLACK;
    let closed = held
        .iter()
        .filter(|stream| closed_within(stream, wait))
        .count();
    assert_eq!(
        closed,
        held.len(),
        "the server kept garbage connections open"
    );
    abuse.end_phase(
        "garbage",
        before,
        format!(
            "{sent_and_closed} connections sent 1-3000 random bytes and closed; \
             {closed} of {} held open were closed by the server",
            held.len()
        ),
    );
}

/// Truncated frames: a valid Put frame cut at many points, then closed; and
/// cut, then held open, which the frame timeout must close.
fn truncated(abuse: &mut Abuse) {
    let before = abuse.clerk.ok_ops();
    let frame = put_frame("truncated", 1000);
    let cuts: Vec<usize> = (1..frame.len()).step_by(7).collect();
    for &cut in &cuts {
        if let Some(mut stream) = connect(abuse.addr()) {
            let _ = stream.write_all(&frame[..cut]);
        }
    }
    let started = Instant::now();
    let held: Vec<TcpStream> = cuts
        .iter()
        .step_by(4)
        .filter_map(|&cut| {
            let mut stream = connect(abuse.addr())?;
            stream.write_all(&frame[..cut]).ok()?;
            Some(stream)
        })
        .collect();
    let wait = Duration::from_millis(FRAME_TIMEOUT_MS) + CLOSE_SLACK;
    let closed = held
        .iter()
        .filter(|stream| closed_within(stream, wait))
        .count();
    assert_eq!(closed, held.len(), "the server kept truncated frames open");
    abuse.end_phase(
        "truncated frames",
        before,
        format!(
            "{} cuts closed at once; {} held open, all closed by the server within {:?}",
            cuts.len(),
            held.len(),
            started.elapsed()
        ),
    );
}

/// A length prefix of 0xFFFF_FFFF (4 GiB - 1, the largest a u32 prefix can
/// say) and other huge ones: refused before any buffer grows, so the RSS does
/// not move, and the connection is closed.
fn huge_prefix(abuse: &mut Abuse) {
    let before = abuse.clerk.ok_ops();
    let rss_before = rss_bytes(abuse.server.pid());
    let prefixes = [u32::MAX, 0x8000_0000, (MAX_FRAME_BYTES + 1) as u32];
    let mut streams = Vec::new();
    for k in 0..60 {
        if let Some(mut stream) = connect(abuse.addr()) {
            let prefix = prefixes[k % prefixes.len()];
            let mut bytes = prefix.to_be_bytes().to_vec();
            bytes.extend_from_slice(&[1u8; 64]);
            let _ = stream.write_all(&bytes);
            streams.push(stream);
        }
    }
    let closed = streams
        .iter()
        .filter(|stream| closed_within(stream, CLOSE_SLACK))
        .count();
    assert_eq!(
        closed,
        streams.len(),
        "a huge length prefix was not refused"
    );
    let rss_after = rss_bytes(abuse.server.pid());
    assert!(
        rss_after < rss_before + (16 << 20),
        "RSS grew from {} to {} MiB on huge prefixes",
        rss_before >> 20,
        rss_after >> 20
    );
    abuse.end_phase(
        "4 GiB length prefix",
        before,
        format!(
            "{} connections announced 4 GiB - 1, 2 GiB or max+1 bytes: all closed; \
             RSS {:.1} -> {:.1} MiB",
            streams.len(),
            rss_before as f64 / (1 << 20) as f64,
            rss_after as f64 / (1 << 20) as f64
        ),
    );
}

/// Frames announced just under the limit (16 MiB - 1), of which only a few
/// bytes come: held together they must not cost the announced size each
/// (100 of them would be 1.6 GiB), and the frame timeout closes them.
fn announced_but_not_sent(abuse: &mut Abuse) {
    let before = abuse.clerk.ok_ops();
    let streams: Vec<TcpStream> = (0..100)
        .filter_map(|_| {
            let mut stream = connect(abuse.addr())?;
            let mut bytes = ((MAX_FRAME_BYTES - 1) as u32).to_be_bytes().to_vec();
            bytes.extend_from_slice(&[0u8; 100]);
            stream.write_all(&bytes).ok()?;
            Some(stream)
        })
        .collect();
    // Let the server sit on them for a while before they time out.
    sleep(Duration::from_millis(FRAME_TIMEOUT_MS / 2));
    let rss_held = rss_bytes(abuse.server.pid());
    let wait = Duration::from_millis(FRAME_TIMEOUT_MS) + CLOSE_SLACK;
    let closed = streams
        .iter()
        .filter(|stream| closed_within(stream, wait))
        .count();
    assert_eq!(closed, streams.len(), "announced frames were kept open");
    abuse.end_phase(
        "frames announced just under the limit",
        before,
        format!(
            "{} connections each announced {} bytes and sent 100; RSS while held {:.1} MiB; \
             all closed by frame_timeout_ms",
            streams.len(),
            MAX_FRAME_BYTES - 1,
            rss_held as f64 / (1 << 20) as f64
        ),
    );
}

/// Opens up to `count` connections (bounded by `time_limit`); returns them
/// and how many connects failed.
fn open_connections(
    addr: SocketAddr,
    count: usize,
    time_limit: Duration,
) -> (Vec<TcpStream>, usize) {
    let started = Instant::now();
    let mut streams = Vec::with_capacity(count);
    let mut failures = 0;
    while streams.len() + failures < count && started.elapsed() < time_limit {
        match connect_raw(addr) {
            Some(stream) => streams.push(stream),
            None => failures += 1,
        }
    }
    (streams, failures)
}

/// How many of `streams` the server has not closed, once the count stops
/// falling (the acceptor closes what is over the limit as it gets to it).
fn settled_open_count(streams: &[TcpStream]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut open = streams.iter().filter(|s| !closed_now(s)).count();
    while Instant::now() < deadline {
        sleep(Duration::from_millis(200));
        let now = streams.iter().filter(|s| !closed_now(s)).count();
        if now == open && now <= MAX_CONNECTIONS {
            break;
        }
        open = now;
    }
    open
}

/// As many idle connections as the fd limit allows. First a burst of
/// `max_connections + 100`: the server holds up to its limit and closes the
/// rest at once. Then the rest, up to the fd limit: the server never holds
/// more than its limit. The held ones are closed by `idle_timeout_ms`; the
/// clerk connected before the flood is served throughout, and a new clerk
/// is served after it.
fn idle_flood(abuse: &mut Abuse, fd_limit: u64, config: &ClusterConfig) {
    let before = abuse.clerk.ok_ops();
    let total = (fd_limit.saturating_sub(300) as usize).min(MAX_IDLE_CONNECTIONS);
    let started = Instant::now();
    let burst = (MAX_CONNECTIONS + 100).min(total);
    let (mut streams, mut connect_failures) =
        open_connections(abuse.addr(), burst, Duration::from_secs(10));
    let burst_time = started.elapsed();
    let held_after_burst = settled_open_count(&streams);
    assert!(
        held_after_burst <= MAX_CONNECTIONS,
        "{held_after_burst} of {} connections held; max_connections is {MAX_CONNECTIONS}",
        streams.len()
    );
    // When the burst and the count took less than the idle timeout and the
    // handshake timeout (an idle connection never shakes hands, so the
    // server drops it after the shorter of the two), none of them can have
    // timed out yet: the server must have filled its slots, all but the
    // clerk's. On a busy machine the burst can take longer than that.
    let hold_ms = IDLE_TIMEOUT_MS.min(kvstore_raft::rpc::handshake::DEFAULT_HANDSHAKE_TIMEOUT_MS);
    let burst_was_quick = started.elapsed() < Duration::from_millis(hold_ms);
    if burst_was_quick {
        assert!(
            held_after_burst >= MAX_CONNECTIONS - 10,
            "only {held_after_burst} of {} connections held in a burst",
            streams.len()
        );
    }
    let (more, failures) = open_connections(
        abuse.addr(),
        total - streams.len() - connect_failures,
        Duration::from_secs(20),
    );
    streams.extend(more);
    connect_failures += failures;
    let opened = streams.len();
    let connect_time = started.elapsed();
    let held = settled_open_count(&streams);
    let rss_held = rss_bytes(abuse.server.pid());
    assert!(
        held <= MAX_CONNECTIONS,
        "{held} of {opened} idle connections are still open; max_connections is \
         {MAX_CONNECTIONS}"
    );
    abuse.clerk.assert_progress(before, 3, "the idle flood");
    let deadline = Instant::now() + Duration::from_millis(IDLE_TIMEOUT_MS) + CLOSE_SLACK;
    let mut still_open = held;
    while still_open > 0 && Instant::now() < deadline {
        sleep(Duration::from_millis(200));
        still_open = streams.iter().filter(|s| !closed_now(s)).count();
    }
    assert_eq!(still_open, 0, "idle connections outlived idle_timeout_ms");
    drop(streams);
    // With the slots free again, a brand-new clerk connects and is served.
    let mut fresh = Clerk::new(config, ClerkOptions::default());
    fresh
        .put("after-flood", "yes")
        .expect("a new clerk after the idle flood");
    assert_eq!(
        fresh.get("after-flood").unwrap().as_deref(),
        Some(&b"yes"[..])
    );
    abuse.end_phase(
        "idle flood",
        before,
        format!(
            "fd limit {fd_limit}; a burst of {burst} in {burst_time:?} left {held_after_burst} \
             held (max_connections {MAX_CONNECTIONS}; the clerk has one); {opened} opened in \
             all in {connect_time:?} ({connect_failures} connects failed), {held} held at the \
             end; RSS then {:.1} MiB; all closed by idle_timeout_ms; a new clerk was then served",
            rss_held as f64 / (1 << 20) as f64
        ),
    );
}

/// Slow writers: each sends a valid frame one byte every 200 ms, just inside
/// the idle timeout every time; the frame timeout must close them long
/// before the frame could complete.
fn slow_writers(abuse: &mut Abuse) {
    let before = abuse.clerk.ok_ops();
    let frame = put_frame("slow", 200);
    let mut writers: Vec<Option<TcpStream>> = (0..20).map(|_| connect(abuse.addr())).collect();
    let started = Instant::now();
    let deadline = started + Duration::from_millis(FRAME_TIMEOUT_MS) + CLOSE_SLACK;
    let mut sent = 0;
    let mut closed_after: Vec<Duration> = Vec::new();
    while Instant::now() < deadline && sent < frame.len() {
        for slot in writers.iter_mut() {
            let Some(stream) = slot else { continue };
            if closed_now(stream) || stream.write_all(&frame[sent..sent + 1]).is_err() {
                closed_after.push(started.elapsed());
                *slot = None;
            }
        }
        if writers.iter().all(Option::is_none) {
            break;
        }
        sent += 1;
        sleep(Duration::from_millis(200));
    }
    let open = writers.iter().filter(|w| w.is_some()).count();
    assert_eq!(
        open,
        0,
        "{open} slow writers still open after {:?} ({sent} of {} bytes sent)",
        started.elapsed(),
        frame.len()
    );
    let slowest = closed_after.iter().max().copied().unwrap_or_default();
    abuse.end_phase(
        "slow writers",
        before,
        format!(
            "{} writers sending 1 byte per 200 ms of a {}-byte frame; all closed by \
             frame_timeout_ms after {sent} bytes, the last after {slowest:?}",
            closed_after.len(),
            frame.len()
        ),
    );
}

#[test]
fn a_node_survives_wire_abuse_with_bounded_memory_and_a_served_clerk() {
    let fd_limit = raise_fd_limit();
    let dir = tempfile::Builder::new()
        .prefix("wire-abuse-")
        .tempdir()
        .unwrap();
    let (mut server, config) = Server::start(dir.path());
    // Wait for the node to lead, through a clerk with a bounded deadline.
    let mut warmup = Clerk::new(&config, ClerkOptions::default());
    for k in 0..50 {
        warmup
            .put(format!("warm{k}"), "x".repeat(100))
            .unwrap_or_else(|e| panic!("the node does not serve: {e}"));
    }
    drop(warmup);
    server.assert_up("start");
    let clerk = BackgroundClerk::start(&config);
    clerk.assert_progress(0, 20, "warm-up");
    let baseline_rss_bytes = rss_bytes(server.pid());
    let rss = RssWatch::start(server.pid());
    let started = Instant::now();
    let mut abuse = Abuse {
        server,
        rss,
        clerk,
        baseline_rss_bytes,
        reports: Vec::new(),
    };
    eprintln!(
        "baseline RSS {:.1} MiB, fd limit {fd_limit}",
        baseline_rss_bytes as f64 / (1 << 20) as f64
    );
    garbage(&mut abuse);
    truncated(&mut abuse);
    huge_prefix(&mut abuse);
    announced_but_not_sent(&mut abuse);
    idle_flood(&mut abuse, fd_limit, &config);
    slow_writers(&mut abuse);
    abuse.server.assert_up("the end");
    let worst = abuse
        .reports
        .iter()
        .max_by_key(|r| r.max_rss_bytes)
        .expect("phases ran");
    eprintln!(
        "all phases in {:?}; clerk ops {}; worst RSS {:.1} MiB in {} (baseline {:.1} MiB)",
        started.elapsed(),
        abuse.clerk.ok_ops(),
        worst.max_rss_bytes as f64 / (1 << 20) as f64,
        worst.name,
        baseline_rss_bytes as f64 / (1 << 20) as f64
    );
    let _ = &worst.note;
}
