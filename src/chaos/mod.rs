//! The chaos runner (issue 5): a Jepsen-style nemesis for real `kvserver`
//! processes. [`run`] starts a cluster whose peer links all pass through
//! fault-injecting proxies, runs concurrent clerks on a few hot keys while a
//! seeded schedule kills, pauses, partitions, delays and drops, heals, and
//! then checks the recorded history: linearizable (the `check` module),
//! every acknowledged append present exactly once, and a write accepted
//! soon after healing. The `chaos` binary is a thin shell around it.
//!
//! - `proxy`: one frame-aware TCP proxy per directed peer link.
//! - `cluster`: the processes, their cluster files and the proxy matrix.
//! - `schedule`: the seeded fault schedule.
//! - `nemesis`: a scheduled fault turned into actions, and undone.
//! - `workload`: the recorded clients.
//! - `slow_reader`: a client that pipelines large reads and stops reading;
//!   it must cause no leader change.
//! - `verdict`: the checks of a history, online or offline.
//! - `runner`: one run from start to verdict.
//! - `report`: what is printed.

pub mod cluster;
pub mod nemesis;
pub mod proxy;
pub mod report;
pub mod runner;
pub mod schedule;
pub mod slow_reader;
pub mod verdict;
pub mod workload;

use std::path::Path;
use std::time::Duration;

pub use runner::{default_faults, run, ChaosOptions, InjectedFault, Outcome, RunReport};
pub use schedule::FaultKind;
pub use verdict::{check_history, HistoryVerdict};

/// Reads a history written by a run (JSON lines) and checks it again.
pub fn check_history_file(path: &Path, timeout: Duration) -> Result<HistoryVerdict, String> {
    let file = std::fs::File::open(path)
        .map_err(|e| format!("cannot open the history {}: {e}", path.display()))?;
    let history = crate::check::read_history_jsonl(std::io::BufReader::new(file))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(check_history(&history, timeout))
}
