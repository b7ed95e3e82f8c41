//! Loopback ports for test servers, shared by every test binary.
//!
//! A port from `bind(127.0.0.1:0)` is in the kernel's ephemeral range, so
//! while its server is down (a restart in a test) the source port of some
//! client's outgoing connection may take it, and the server cannot listen
//! again ("Address already in use"). Ports here come from below that range
//! and are claimed per process by a file lock, so concurrent test processes
//! do not share them either.
#![allow(dead_code)]

use std::fs::{self, File};
use std::net::TcpListener;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Mutex;

/// The most candidate ports tried when looking for free ones.
const MAX_PORT_PROBES: usize = 2_000;

/// The range lies below the kernel's ephemeral range (32768 and up on Linux).
const PORT_RANGE_START: u16 = 20_000;
const PORT_RANGE_LEN: u16 = 12_000;
/// The next candidate port (an offset into the range); 0 until first use.
static NEXT_PORT: AtomicU16 = AtomicU16::new(0);
/// Ports this process has claimed, each by a lock on a file in
/// `port_lock_dir()`, held until the process exits (the kernel drops the
/// locks then, even after SIGKILL). Another run of these tests at the same
/// time skips them: without this, its node could listen on the port of one
/// of our nodes while that node is down, and our clerks would talk to the
/// wrong cluster.
static PORT_LOCKS: Mutex<Vec<File>> = Mutex::new(Vec::new());

fn port_lock_dir() -> PathBuf {
    std::env::temp_dir().join("kvstore-raft-test-ports")
}

/// Claims `port` for this process: true if no other process holds it.
fn claim_port(port: u16) -> bool {
    let dir = port_lock_dir();
    fs::create_dir_all(&dir).expect("create the port lock directory");
    let file = File::create(dir.join(port.to_string())).expect("create a port lock file");
    // SAFETY: flock on a file descriptor we own.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if locked {
        PORT_LOCKS.lock().unwrap().push(file);
    }
    locked
}

/// `count` distinct ports on 127.0.0.1, claimed for this process and free a
/// moment ago (bound, then released).
pub fn free_ports(count: usize) -> Vec<u16> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id();
    let _ = NEXT_PORT.compare_exchange(
        0,
        (seed % u32::from(PORT_RANGE_LEN)) as u16 + 1,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    let mut ports = Vec::new();
    for _ in 0..MAX_PORT_PROBES {
        let offset = NEXT_PORT.fetch_add(1, Ordering::SeqCst) % PORT_RANGE_LEN;
        let port = PORT_RANGE_START + offset;
        if claim_port(port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
            if ports.len() == count {
                return ports;
            }
        }
    }
    panic!("found only {} free ports of {count}", ports.len());
}
