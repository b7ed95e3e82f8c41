//! One chaos run from start to verdict: start the cluster, wait until it
//! takes a write, start the clients, play the fault schedule, heal
//! everything, measure how long until the cluster takes a write again, stop
//! the clients, read every key, write the history and check it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::cluster::{self, Cluster};
use super::nemesis::{self, Undo};
use super::schedule::{self, Episode, FaultKind, ScheduleTiming};
use super::verdict::{check_history, HistoryVerdict};
use super::workload::{self, OpCounts};
use crate::check::{write_history_jsonl, KvInput, Operation};
use crate::clerk::Clerk;

/// What to run.
#[derive(Clone, Debug)]
pub struct ChaosOptions {
    pub nodes: u64,
    pub clients: u64,
    pub duration: Duration,
    pub seed: u64,
    /// Hot keys: half append keys, half registers (see `workload`).
    pub keys: usize,
    pub faults: Vec<FaultKind>,
    /// The `kvserver` binary.
    pub kvserver: PathBuf,
    /// Where the cluster files, data and logs go; a fresh temporary
    /// directory (removed after a passing run) when `None`.
    pub work_dir: Option<PathBuf>,
    /// Where the history goes (JSON lines, the checker's format).
    pub history: PathBuf,
    /// How long the checker may search.
    pub check_timeout: Duration,
    /// How soon after healing the cluster must take a write.
    pub recovery_budget: Duration,
    /// Progress lines (faults as they happen) go to stderr.
    pub verbose: bool,
    /// Runs the slow reader (see `slow_reader`) beside the clients.
    pub slow_reader: bool,
}

impl ChaosOptions {
    /// The defaults of the `chaos` binary, for `seed`, with `kvserver`.
    pub fn new(seed: u64, kvserver: PathBuf) -> ChaosOptions {
        ChaosOptions {
            nodes: 5,
            clients: 8,
            duration: Duration::from_secs(60),
            seed,
            keys: 4,
            faults: default_faults(),
            kvserver,
            work_dir: None,
            history: std::env::temp_dir().join(format!("chaos-{seed}-history.jsonl")),
            check_timeout: Duration::from_secs(120),
            recovery_budget: Duration::from_millis(
                RECOVERY_ELECTION_TIMEOUTS * cluster::ELECTION_TIMEOUT_MAX_MS,
            ),
            verbose: false,
            slow_reader: true,
        }
    }
}

/// The fault kinds used when none are named: all of them.
pub fn default_faults() -> Vec<FaultKind> {
    FaultKind::ALL.to_vec()
}

/// The default recovery budget, in maximal election timeouts: an election
/// or two, plus reconnects and a restarted node's log replay.
const RECOVERY_ELECTION_TIMEOUTS: u64 = 10;
/// How long the cluster may take to accept its first write.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// The final reads' deadline, per key.
const FINAL_READ_TIMEOUT_MS: u64 = 10_000;
/// How often the runner looks for nodes that died on their own.
const WATCH_INTERVAL: Duration = Duration::from_millis(50);
/// The quiet start before the first fault.
const WARMUP_MS: u64 = 1_000;

/// A fault as it was injected.
#[derive(Clone, Debug)]
pub struct InjectedFault {
    pub start_ms: u64,
    pub end_ms: u64,
    pub description: String,
}

/// Everything a run found.
#[derive(Debug)]
pub struct RunReport {
    pub options: ChaosOptions,
    pub work_dir: PathBuf,
    pub work_dir_kept: bool,
    pub faults: Vec<InjectedFault>,
    pub counts: OpCounts,
    pub history_ops: usize,
    /// Time from the heal to the first accepted write, or why there was none.
    pub recovery: Result<Duration, String>,
    /// A node that exited on its own, with its status and last log lines.
    pub crashed_node: Option<String>,
    pub verdict: HistoryVerdict,
    pub frames_dropped: u64,
    /// The slow reader's stalled connections.
    pub stalls: Vec<super::slow_reader::Stall>,
    /// Stalls after which the stalled leader no longer led its term while
    /// no fault was injected within a second of the stall: leader changes
    /// the slow reader caused. Must be none.
    pub slow_reader_leader_changes: usize,
}

/// The overall result of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Violation,
    /// The checker could not decide in time.
    Undecided,
}

impl RunReport {
    pub fn outcome(&self) -> Outcome {
        if self.verdict.violated()
            || self.recovery.is_err()
            || self.crashed_node.is_some()
            || self.slow_reader_leader_changes > 0
        {
            Outcome::Violation
        } else if self.verdict.passed() {
            Outcome::Passed
        } else {
            Outcome::Undecided
        }
    }
}

/// Runs one chaos run. `Err` is an infrastructure failure (the cluster
/// could not be started or files written), not a finding about the store.
/// A leader change within this long of a fault counts as the fault's.
const FAULT_MARGIN_MS: u64 = 1_000;

pub fn run(options: &ChaosOptions) -> Result<RunReport, String> {
    let (work_dir, temporary) = prepare_work_dir(options)?;
    let mut cluster = Cluster::start(&work_dir, &options.kvserver, options.nodes, options.seed)?;
    let config = cluster.client_config().clone();
    let status_clerk = Clerk::new(&config, workload::clerk_options(0, 1_000));
    let startup = Instant::now();
    wait_for_write(&config, STARTUP_TIMEOUT).map_err(|e| {
        format!(
            "the cluster took no write within {STARTUP_TIMEOUT:?} of starting ({e}); logs in {}",
            work_dir.display()
        )
    })?;
    progress(options, format!("cluster up in {:?}", startup.elapsed()));

    let timing = ScheduleTiming {
        duration_ms: options.duration.as_millis() as u64,
        warmup_ms: WARMUP_MS,
        min_pause_ms: 4 * cluster::ELECTION_TIMEOUT_MAX_MS,
    };
    let episodes = schedule::generate(options.seed, options.nodes, &options.faults, &timing);
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let clients = {
        let (config, stop) = (config.clone(), Arc::clone(&stop));
        let (count, keys, seed) = (options.clients, options.keys, options.seed);
        thread::Builder::new()
            .name("chaos-clients".into())
            .spawn(move || workload::run_clients(&config, count, keys, seed, epoch, &stop))
            .map_err(|e| format!("cannot start the clients: {e}"))?
    };

    let slow_reader = options
        .slow_reader
        .then(|| {
            let (config, stop) = (config.clone(), Arc::clone(&stop));
            thread::Builder::new()
                .name("chaos-slow-reader".into())
                .spawn(move || super::slow_reader::run(&config, epoch, &stop))
                .map_err(|e| format!("cannot start the slow reader: {e}"))
        })
        .transpose()?;

    let mut nemesis = Nemesis {
        cluster: &mut cluster,
        status: &status_clerk,
        epoch,
        faults: Vec::new(),
        crashed: None,
        options,
    };
    let play = nemesis.play(&episodes, timing.duration_ms);
    stop.store(true, Ordering::SeqCst);
    let healed = nemesis.heal_all();
    play.and(healed)
        .map_err(|e| format!("the nemesis failed: {e}; logs in {}", work_dir.display()))?;
    let (faults, mut crashed) = (nemesis.faults, nemesis.crashed);
    let mut extra_ops = Vec::new();
    let recovery = probe_recovery(&config, options, epoch, &mut extra_ops);
    if let Ok(after) = &recovery {
        progress(
            options,
            format!("healed; a write was accepted {after:?} later"),
        );
    }
    let (recorded, counts) = clients
        .join()
        .map_err(|_| "a chaos client panicked".to_string())?;
    let stalls = match slow_reader {
        Some(thread) => thread
            .join()
            .map_err(|_| "the slow reader panicked".to_string())?,
        None => Vec::new(),
    };
    let slow_reader_leader_changes = stalls
        .iter()
        .filter(|stall| !stall.leader_kept())
        .filter(|stall| {
            !faults.iter().any(|fault| {
                fault.start_ms <= stall.end_ms + FAULT_MARGIN_MS
                    && stall.start_ms <= fault.end_ms + FAULT_MARGIN_MS
            })
        })
        .count();
    final_reads(&config, options, epoch, &mut extra_ops);
    if crashed.is_none() {
        crashed = crashed_node(&mut cluster);
    }
    let frames_dropped = cluster.frames_dropped();
    drop(cluster);

    let mut history = recorded.ops;
    history.extend(extra_ops);
    history.sort_by_key(|op| op.call_us);
    write_history(&options.history, &history)?;
    progress(options, format!("checking {} operations", history.len()));
    let verdict = check_history(&history, options.check_timeout);
    let mut report = RunReport {
        options: options.clone(),
        work_dir: work_dir.clone(),
        work_dir_kept: true,
        faults,
        counts,
        history_ops: history.len(),
        recovery,
        crashed_node: crashed,
        verdict,
        frames_dropped,
        stalls,
        slow_reader_leader_changes,
    };
    if temporary && report.outcome() == Outcome::Passed {
        report.work_dir_kept = std::fs::remove_dir_all(&work_dir).is_err();
    }
    Ok(report)
}

fn progress(options: &ChaosOptions, line: String) {
    if options.verbose {
        eprintln!("chaos: {line}");
    }
}

/// The work directory, and whether the runner made it (and may remove it).
fn prepare_work_dir(options: &ChaosOptions) -> Result<(PathBuf, bool), String> {
    let (dir, temporary) = match &options.work_dir {
        Some(dir) => (dir.clone(), false),
        None => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let name = format!("chaos-{}-{}-{nanos}", options.seed, std::process::id());
            (std::env::temp_dir().join(name), true)
        }
    };
    if dir.join("data").exists() {
        return Err(format!(
            "{} already holds a cluster's data; give a fresh --work-dir",
            dir.display()
        ));
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok((dir, temporary))
}

/// Tries one put until `timeout`.
fn wait_for_write(config: &crate::config::ClusterConfig, timeout: Duration) -> Result<(), String> {
    let mut clerk = Clerk::new(
        config,
        workload::clerk_options(0, timeout.as_millis() as u64),
    );
    clerk.put("chaos-start", "up").map_err(|e| e.to_string())
}

/// Measures how long after the heal the cluster takes a write (recorded in
/// the history like any other operation).
fn probe_recovery(
    config: &crate::config::ClusterConfig,
    options: &ChaosOptions,
    epoch: Instant,
    ops: &mut Vec<Operation>,
) -> Result<Duration, String> {
    let budget_ms = options.recovery_budget.as_millis() as u64;
    let client = options.clients + 2;
    let mut clerk = Clerk::new(config, workload::clerk_options(client, budget_ms));
    let start = Instant::now();
    let input = KvInput::Put {
        key: "chaos-recovery".into(),
        value: "healed".into(),
    };
    let op = workload::record(&mut clerk, input, client, epoch);
    let accepted = op.output.is_some();
    ops.push(op);
    if accepted {
        Ok(start.elapsed())
    } else {
        Err(format!(
            "the cluster took no write within {budget_ms} ms of healing"
        ))
    }
}

/// Reads every key once, as the last client; these reads hold the final
/// values the append check uses.
fn final_reads(
    config: &crate::config::ClusterConfig,
    options: &ChaosOptions,
    epoch: Instant,
    ops: &mut Vec<Operation>,
) {
    let client = options.clients + 1;
    let mut clerk = Clerk::new(
        config,
        workload::clerk_options(client, FINAL_READ_TIMEOUT_MS),
    );
    let (append_keys, register_keys) = workload::key_names(options.keys);
    for key in append_keys.into_iter().chain(register_keys) {
        ops.push(workload::record(
            &mut clerk,
            KvInput::Get { key },
            client,
            epoch,
        ));
    }
}

fn crashed_node(cluster: &mut Cluster) -> Option<String> {
    let (id, status) = cluster.exited_node()?;
    Some(format!(
        "node {id} exited on its own ({status}); last log lines:\n{}",
        cluster.log_tail(id, 20)
    ))
}

fn write_history(path: &Path, history: &[Operation]) -> Result<(), String> {
    let file = std::fs::File::create(path)
        .map_err(|e| format!("cannot create the history file {}: {e}", path.display()))?;
    write_history_jsonl(std::io::BufWriter::new(file), history)
        .map_err(|e| format!("cannot write the history file {}: {e}", path.display()))
}

/// Plays the schedule on the cluster.
struct Nemesis<'a> {
    cluster: &'a mut Cluster,
    status: &'a Clerk,
    epoch: Instant,
    faults: Vec<InjectedFault>,
    crashed: Option<String>,
    options: &'a ChaosOptions,
}

impl Nemesis<'_> {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Injects each episode and undoes it, then waits out the run. Stops
    /// early when a node dies on its own; `Err` when the nemesis itself
    /// failed.
    fn play(&mut self, episodes: &[Episode], duration_ms: u64) -> Result<(), String> {
        for episode in episodes {
            if !self.watch_until(episode.start_ms) {
                return Ok(());
            }
            let start_ms = self.now_ms();
            let (description, undo) = nemesis::apply(self.cluster, self.status, &episode.fault)?;
            progress(
                self.options,
                format!("{:>7.3}s {description}", start_ms as f64 / 1e3),
            );
            let survived = self.watch_until(episode.end_ms());
            nemesis::undo(self.cluster, &undo)?;
            self.faults.push(InjectedFault {
                start_ms,
                end_ms: self.now_ms(),
                description,
            });
            if !survived {
                return Ok(());
            }
        }
        self.watch_until(duration_ms);
        Ok(())
    }

    /// Sleeps until `ms` on the run's clock, watching for nodes that exit
    /// on their own; false when one did.
    fn watch_until(&mut self, ms: u64) -> bool {
        while self.now_ms() < ms {
            if let Some(crash) = crashed_node(self.cluster) {
                progress(self.options, crash.clone());
                self.crashed = Some(crash);
                return false;
            }
            thread::sleep(WATCH_INTERVAL.min(Duration::from_millis(ms - self.now_ms().min(ms))));
        }
        true
    }

    /// Ends every fault: the network heals, stopped nodes continue, killed
    /// nodes restart, disks run again. Goes on past a failure, and returns
    /// the first one.
    fn heal_all(&mut self) -> Result<(), String> {
        self.cluster.heal_network();
        let mut first_error = Ok(());
        for id in 1..=self.cluster.size() {
            let mut results = vec![nemesis::undo(self.cluster, &Undo::DiskStall(id))];
            if self.cluster.is_running(id) {
                results.push(self.cluster.set_paused(id, false));
            } else if self.crashed.is_none() {
                results.push(self.cluster.start_node(id));
            }
            for result in results {
                if let (Err(e), Ok(())) = (result, &first_error) {
                    first_error = Err(format!("healing node {id}: {e}"));
                }
            }
        }
        first_error
    }
}
