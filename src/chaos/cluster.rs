//! The cluster under test: `kvserver` child processes on loopback ports,
//! each with its own cluster file in which its own entry has its real port
//! and every peer's entry has the port of the proxy for the link (this node
//! -> that peer), so every Raft message between two nodes crosses a
//! [`LinkProxy`] the runner controls. Clerks use a cluster file with the
//! real ports: the faults are between the nodes, not between clients and
//! nodes.
//!
//! A node's place in the cluster is a *slot* (1..=size): its ports, proxies,
//! data directory, log and fault file. A slot starts as the member of the
//! same id; the `membership` fault replaces the member with a new one (a
//! fresh id, started with `--join --listen` on the slot's real port, the
//! data directory wiped), so every method here takes a slot and
//! [`Cluster::member_id`] names the member in it. A new member's address in
//! the replicated membership is its real port, so the links to it do not
//! cross the proxies (and, once the log gives addresses, every node takes
//! the bootstrap members' addresses from the leader's file, which names the
//! leader's proxies): after a membership change the network faults still
//! happen, on fewer or other links than the schedule names.
//!
//! Nodes are killed with SIGKILL and hung with SIGSTOP/SIGCONT (kill(2) via
//! libc), and restarted on their data directory. Each node watches its own
//! fault file (`kvserver --fault-file`), which stalls its fsyncs while it
//! says `stall`. Each child asks the kernel
//! to kill it when the thread that started it ends, so an aborted run leaves
//! no server behind; the runner therefore starts every node from one thread.

use std::fs::{self, File, OpenOptions};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use serde_json::json;

use super::proxy::{DirectionFaults, LinkFaults, LinkProxy};
use crate::config::ClusterConfig;

/// The timings of chaos clusters: short elections, so a run sees many.
pub const TICK_MS: u64 = 10;
pub const ELECTION_TIMEOUT_MIN_MS: u64 = 150;
pub const ELECTION_TIMEOUT_MAX_MS: u64 = 300;
pub const HEARTBEAT_INTERVAL_MS: u64 = 30;
/// Frames are small in these runs; a lower limit keeps proxy queues small.
pub const MAX_FRAME_BYTES: usize = 4 << 20;
/// Snapshot early, so lagging and restarted nodes catch up by snapshot too.
const SNAPSHOT_THRESHOLD_BYTES: u64 = 256 << 10;

/// Node ports come from below the kernel's ephemeral range (32768 and up),
/// so no client's source port can take a killed node's port before it comes
/// back; each is claimed with a lock file shared with the process tests.
const PORT_RANGE_START: u16 = 20_000;
const PORT_RANGE_LEN: u16 = 12_000;
const MAX_PORT_PROBES: usize = 2_000;

/// A node's process, or why it is not running.
enum NodeState {
    Running { child: Child, paused: bool },
    Killed,
}

/// The running cluster. Dropping it kills every node and stops the proxies.
pub struct Cluster {
    work_dir: PathBuf,
    kvserver: PathBuf,
    /// Index `id - 1`.
    nodes: Vec<NodeState>,
    /// Index `(from - 1) * size + (to - 1)`; `None` on the diagonal.
    proxies: Vec<Option<LinkProxy>>,
    client_config: ClusterConfig,
    client_config_path: PathBuf,
    /// The member id in each slot (index `slot - 1`); starts as the slot.
    member_ids: Vec<u64>,
    /// The id the next new member gets: above every id used so far.
    next_member_id: u64,
    /// Held for the cluster's lifetime: they keep the node ports ours.
    _port_locks: Vec<File>,
}

impl Cluster {
    /// Writes the cluster files and starts `size` nodes and their proxies in
    /// `work_dir`. `seed` seeds the proxies' drop decisions.
    pub fn start(
        work_dir: &Path,
        kvserver: &Path,
        size: u64,
        seed: u64,
    ) -> Result<Cluster, String> {
        fs::create_dir_all(work_dir.join("data"))
            .map_err(|e| format!("cannot create {}: {e}", work_dir.display()))?;
        let (ports, port_locks) = claim_free_ports(size as usize)?;
        let real: Vec<SocketAddr> = ports
            .iter()
            .map(|&port| SocketAddr::from(([127, 0, 0, 1], port)))
            .collect();
        let mut proxies = Vec::new();
        for from in 1..=size {
            for to in 1..=size {
                let proxy = if from == to {
                    None
                } else {
                    let link_seed = seed ^ (from << 32 | to).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    let target = real[(to - 1) as usize];
                    Some(
                        LinkProxy::start(target, MAX_FRAME_BYTES, link_seed)
                            .map_err(|e| format!("cannot start the proxy {from}->{to}: {e}"))?,
                    )
                };
                proxies.push(proxy);
            }
        }
        let data_dir = work_dir.join("data");
        for id in 1..=size {
            let ports: Vec<u16> = (1..=size)
                .map(
                    |peer| match &proxies[((id - 1) * size + (peer - 1)) as usize] {
                        Some(proxy) => proxy.addr().port(),
                        None => ports[(peer - 1) as usize],
                    },
                )
                .collect();
            write_config(&node_config_path(work_dir, id), &ports, &data_dir)?;
        }
        let client_config_path = work_dir.join("clients.json");
        write_config(&client_config_path, &ports, &data_dir)?;
        let client_config = ClusterConfig::load(&client_config_path).map_err(|e| e.to_string())?;
        let mut cluster = Cluster {
            work_dir: work_dir.to_path_buf(),
            kvserver: kvserver.to_path_buf(),
            nodes: (0..size).map(|_| NodeState::Killed).collect(),
            proxies,
            client_config,
            client_config_path,
            member_ids: (1..=size).collect(),
            next_member_id: size + 1,
            _port_locks: port_locks,
        };
        for id in 1..=size {
            cluster.start_node(id)?;
        }
        Ok(cluster)
    }

    pub fn size(&self) -> u64 {
        self.nodes.len() as u64
    }

    /// The cluster file the clerks use (real ports).
    pub fn client_config(&self) -> &ClusterConfig {
        &self.client_config
    }

    pub fn client_config_path(&self) -> &Path {
        &self.client_config_path
    }

    pub fn log_path(&self, id: u64) -> PathBuf {
        self.work_dir.join(format!("node{id}.log"))
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.work_dir.join("data").join(format!("node{id}"))
    }

    /// Where node `id` looks for disk faults (`--fault-file`).
    pub fn fault_file(&self, id: u64) -> PathBuf {
        self.work_dir.join(format!("node{id}.fault"))
    }

    /// The member id in slot `slot`.
    pub fn member_id(&self, slot: u64) -> u64 {
        self.member_ids[(slot - 1) as usize]
    }

    /// The slot member `id` runs in, if it is one of this cluster's.
    pub fn slot_of(&self, id: u64) -> Option<u64> {
        self.member_ids
            .iter()
            .position(|&member| member == id)
            .map(|index| index as u64 + 1)
    }

    /// The real address of slot `slot` (where clients and new members
    /// reach it).
    pub fn real_addr(&self, slot: u64) -> Result<SocketAddr, String> {
        self.client_config
            .node(slot)
            .map(|node| node.addr())
            .ok_or_else(|| format!("no slot {slot}"))
    }

    /// Kills slot `slot` and deletes its data directory: the disk is gone.
    pub fn kill_and_wipe(&mut self, slot: u64) -> Result<(), String> {
        self.kill(slot);
        let dir = self.data_dir(slot);
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(format!("cannot wipe {}: {e}", dir.display()))
            }
            _ => Ok(()),
        }
    }

    /// Starts a new member in slot `slot` (down, wiped) under a fresh id,
    /// with `--join`; returns the id. It is not a member until added.
    pub fn start_new_member(&mut self, slot: u64) -> Result<u64, String> {
        let id = self.next_member_id;
        self.next_member_id += 1;
        self.member_ids[(slot - 1) as usize] = id;
        self.start_node(slot)?;
        Ok(id)
    }

    /// Starts slot `slot` on its data directory; stderr goes to its log. A
    /// slot holding a member the file does not list runs with `--join
    /// --listen` (which only matters on an empty data directory).
    pub fn start_node(&mut self, slot: u64) -> Result<(), String> {
        let id = slot;
        let member = self.member_id(slot);
        let index = (id - 1) as usize;
        if let NodeState::Running { .. } = self.nodes[index] {
            return Err(format!("node {id} is already running"));
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))
            .map_err(|e| format!("cannot open the log of node {id}: {e}"))?;
        let mut command = Command::new(&self.kvserver);
        command
            .arg("--config")
            .arg(node_config_path(&self.work_dir, id))
            .arg("--id")
            .arg(member.to_string())
            .arg("--data-dir")
            .arg(self.data_dir(id))
            .arg("--fault-file")
            .arg(self.fault_file(id));
        if member != slot {
            command
                .arg("--join")
                .arg("--listen")
                .arg(self.real_addr(slot)?.to_string());
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        die_with_this_thread(&mut command);
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.kvserver.display()))?;
        self.nodes[index] = NodeState::Running {
            child,
            paused: false,
        };
        Ok(())
    }

    /// kill -9 node `id` and reap it. A node already down stays down.
    pub fn kill(&mut self, id: u64) {
        let index = (id - 1) as usize;
        if let NodeState::Running { child, .. } = &mut self.nodes[index] {
            // Both fail only for a child that has already exited and been
            // reaped: then it is as dead as wanted.
            let _ = child.kill();
            let _ = child.wait();
        }
        self.nodes[index] = NodeState::Killed;
    }

    /// SIGSTOP (`stop`) or SIGCONT node `id`, if it runs.
    pub fn set_paused(&mut self, id: u64, stop: bool) -> Result<(), String> {
        if let NodeState::Running { child, paused } = &mut self.nodes[(id - 1) as usize] {
            let signal = if stop { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: kill(2) on a child we started and have not reaped.
            if unsafe { libc::kill(child.id() as libc::pid_t, signal) } != 0 {
                let error = std::io::Error::last_os_error();
                return Err(format!("cannot signal node {id}: {error}"));
            }
            *paused = stop;
        }
        Ok(())
    }

    pub fn is_running(&self, id: u64) -> bool {
        matches!(self.nodes[(id - 1) as usize], NodeState::Running { .. })
    }

    /// The first node that should run but has exited, with its status.
    pub fn exited_node(&mut self) -> Option<(u64, ExitStatus)> {
        for (index, state) in self.nodes.iter_mut().enumerate() {
            if let NodeState::Running { child, .. } = state {
                if let Ok(Some(status)) = child.try_wait() {
                    return Some((index as u64 + 1, status));
                }
            }
        }
        None
    }

    /// The last `lines` lines of node `id`'s log.
    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let log = fs::read_to_string(self.log_path(id)).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn proxy(&self, from: u64, to: u64) -> &LinkProxy {
        let size = self.size();
        self.proxies[((from - 1) * size + (to - 1)) as usize]
            .as_ref()
            .expect("no proxy from a node to itself")
    }

    /// Changes the faults of the messages going from `from` to `to`: the
    /// requests `from` sends on its link, and the replies `from` sends on
    /// `to`'s link.
    pub fn set_flow(&self, from: u64, to: u64, faults: DirectionFaults) {
        let outbound = self.proxy(from, to);
        outbound.set_faults(LinkFaults {
            forward: faults,
            ..outbound.faults()
        });
        let inbound = self.proxy(to, from);
        inbound.set_faults(LinkFaults {
            backward: faults,
            ..inbound.faults()
        });
    }

    /// Cuts `a` and `b` apart: both links close and refuse connections.
    pub fn cut(&self, a: u64, b: u64) {
        let refuse = LinkFaults {
            refuse: true,
            ..LinkFaults::default()
        };
        self.proxy(a, b).set_faults(refuse);
        self.proxy(b, a).set_faults(refuse);
    }

    /// Cuts every node of `left` from every node of `right`.
    pub fn partition(&self, left: &[u64], right: &[u64]) {
        for &a in left {
            for &b in right {
                self.cut(a, b);
            }
        }
    }

    /// Every ordered pair of distinct nodes.
    pub fn links(&self) -> Vec<(u64, u64)> {
        let ids = 1..=self.size();
        ids.clone()
            .flat_map(|from| ids.clone().map(move |to| (from, to)))
            .filter(|(from, to)| from != to)
            .collect()
    }

    /// Clears every link fault.
    pub fn heal_network(&self) {
        for proxy in self.proxies.iter().flatten() {
            proxy.heal();
        }
    }

    /// Frames dropped by all proxies so far.
    pub fn frames_dropped(&self) -> u64 {
        self.proxies
            .iter()
            .flatten()
            .map(|p| {
                p.stats()
                    .frames_dropped
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too.
        for id in 1..=self.size() {
            self.kill(id);
        }
    }
}

fn node_config_path(work_dir: &Path, id: u64) -> PathBuf {
    work_dir.join(format!("node{id}.json"))
}

/// Writes a cluster file listing node `i` (from 1) at `ports[i - 1]`.
fn write_config(path: &Path, ports: &[u16], data_dir: &Path) -> Result<(), String> {
    let nodes: Vec<serde_json::Value> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| json!({"id": i + 1, "ip": "127.0.0.1", "port": port}))
        .collect();
    let config = json!({
        "raft_nodes": nodes,
        "data_dir": data_dir.display().to_string(),
        "tick_ms": TICK_MS,
        "election_timeout_min_ms": ELECTION_TIMEOUT_MIN_MS,
        "election_timeout_max_ms": ELECTION_TIMEOUT_MAX_MS,
        "heartbeat_interval_ms": HEARTBEAT_INTERVAL_MS,
        "max_frame_bytes": MAX_FRAME_BYTES,
        "snapshot_threshold_bytes": SNAPSHOT_THRESHOLD_BYTES,
    });
    fs::write(path, format!("{config:#}\n"))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// `count` ports of 127.0.0.1 that were free a moment ago, each claimed by a
/// lock on a file in the temp dir's `kvstore-raft-test-ports` (the process
/// tests use the same), so two runs at once never share a port.
fn claim_free_ports(count: usize) -> Result<(Vec<u16>, Vec<File>), String> {
    let dir = std::env::temp_dir().join("kvstore-raft-test-ports");
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id();
    let first = (seed % u32::from(PORT_RANGE_LEN)) as usize;
    let (mut ports, mut locks) = (Vec::new(), Vec::new());
    for probe in 0..MAX_PORT_PROBES {
        let port = PORT_RANGE_START + ((first + probe) % usize::from(PORT_RANGE_LEN)) as u16;
        let path = dir.join(port.to_string());
        let file =
            File::create(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        // SAFETY: flock on a file descriptor we own.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if locked && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
            locks.push(file);
            if ports.len() == count {
                return Ok((ports, locks));
            }
        }
    }
    Err(format!("found only {} free ports of {count}", ports.len()))
}

/// Asks the kernel to SIGKILL the child when the spawning thread ends.
fn die_with_this_thread(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}
