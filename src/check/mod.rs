//! A linearizability checker for histories of key-value operations, in the
//! manner of Porcupine: the history is split by key (a history is
//! linearizable exactly when each key's sub-history is: P-compositionality),
//! and each key is searched with the Wing & Gong / Lowe algorithm, memoizing
//! (set of linearized operations, model state) pairs already explored.
//!
//! Used by the tests, `loadgen --check` and the chaos runner. A history is
//! serde-serializable, so it can be written as JSON lines
//! ([`write_history_jsonl`]) and re-checked offline ([`read_history_jsonl`]).
//!
//! An operation whose outcome is unknown (the clerk timed out) has no output
//! and no return time: it may have taken effect at any point after its call,
//! or never, and the checker accepts either.

mod appends;
mod model;
mod search;

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use self::appends::{check_appends, AppendViolation};

/// The most operations `read_history_jsonl` accepts: the search is
/// exponential in the worst case, so far larger histories are hopeless anyway.
pub const MAX_HISTORY_OPS: usize = 10_000_000;

/// What a clerk asked for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum KvInput {
    Get {
        key: String,
    },
    Put {
        key: String,
        value: String,
    },
    Append {
        key: String,
        value: String,
    },
    Delete {
        key: String,
    },
    Cas {
        key: String,
        expected: String,
        value: String,
    },
}

impl KvInput {
    pub fn key(&self) -> &str {
        match self {
            KvInput::Get { key }
            | KvInput::Put { key, .. }
            | KvInput::Append { key, .. }
            | KvInput::Delete { key }
            | KvInput::Cas { key, .. } => key,
        }
    }
}

/// What the clerk was told. A missing key reads as `Get { value: None }`;
/// for Append and Cas a missing key counts as "".
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum KvOutput {
    Get {
        value: Option<String>,
    },
    Put,
    Append,
    Delete {
        existed: bool,
    },
    /// `current` is the value before the operation; `None` when the server
    /// did not return it (then only `swapped` and `found` are checked).
    Cas {
        swapped: bool,
        found: bool,
        current: Option<String>,
    },
}

/// One operation of a history. Times are microseconds on one clock shared
/// by all clients of the history.
///
/// The outcome is known only when both `output` and `return_us` are set;
/// otherwise the operation counts as pending forever (return time infinity)
/// with any output. A `return_us` below `call_us` is read as `call_us`.
// Unknown fields are refused: a misspelled `output` would otherwise turn
// an operation into one of unknown outcome, silently weakening the check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    pub client_id: u64,
    pub input: KvInput,
    pub call_us: u64,
    pub output: Option<KvOutput>,
    pub return_us: Option<u64>,
}

impl Operation {
    fn is_known(&self) -> bool {
        self.output.is_some() && self.return_us.is_some()
    }
}

/// The return time of an operation, in microseconds since `epoch`, for a
/// recorder of a sequential client: it waits (under a microsecond) until the
/// clock has moved past the stamp before handing control back, so that the
/// client's next call is stamped strictly later. The checker orders calls
/// before returns at equal times (operations that touch count as
/// concurrent, the permissive reading needed across clients), so without
/// this a client's next operation stamped at its previous one's return
/// microsecond would be free to linearize before it, and read-your-writes
/// violations would pass.
pub fn return_stamp_us(epoch: Instant) -> u64 {
    let stamp_us = micros_since(epoch);
    while micros_since(epoch) <= stamp_us {
        std::hint::spin_loop();
    }
    stamp_us
}

/// Microseconds since `epoch`, the clock of recorded histories.
pub fn micros_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_micros() as u64
}

/// The checker's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// The operations on `key` admit no linearization. `ops` is the shortest
    /// prefix in time of that key's history that already admits none: every
    /// operation on `key` called before the last return it needs, in call
    /// order (operations still running at that point count as pending).
    NotLinearizable {
        key: String,
        ops: Vec<Operation>,
    },
    /// The search ran out of time (or memory budget) before deciding, and no
    /// key was found non-linearizable before that.
    Timeout,
}

/// The most (linearized set, state) pairs remembered per key: past this the
/// search gives up with `Timeout` rather than exhaust memory.
const MAX_CACHE_ENTRIES: usize = 4_000_000;

/// Checks `history` for linearizability against a key-value store, giving up
/// after `timeout`.
pub fn check(history: &[Operation], timeout: Duration) -> Verdict {
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    for (key, ops) in partition_by_key(history) {
        match search::linearizable(&ops, deadline, MAX_CACHE_ENTRIES) {
            search::Outcome::Linearizable => {}
            search::Outcome::Timeout => timed_out = true,
            search::Outcome::NotLinearizable => {
                let ops = shortest_failing_prefix(ops, deadline);
                return Verdict::NotLinearizable {
                    key: key.to_string(),
                    ops,
                };
            }
        }
    }
    if timed_out {
        Verdict::Timeout
    } else {
        Verdict::Linearizable
    }
}

/// Each key's operations in call order. Gets of unknown outcome are left
/// out: they change nothing and may return anything.
fn partition_by_key(history: &[Operation]) -> BTreeMap<&str, Vec<Operation>> {
    let mut partitions: BTreeMap<&str, Vec<Operation>> = BTreeMap::new();
    for op in history {
        if matches!(op.input, KvInput::Get { .. }) && !op.is_known() {
            continue;
        }
        partitions
            .entry(op.input.key())
            .or_default()
            .push(op.clone());
    }
    for ops in partitions.values_mut() {
        ops.sort_by_key(|op| op.call_us);
    }
    partitions
}

/// The history as it stood at `time_us`: the operations called by then, with
/// those that had not returned by then turned pending (outcome unknown).
fn prefix_at(ops: &[Operation], time_us: u64) -> Vec<Operation> {
    ops.iter()
        .filter(|op| op.call_us <= time_us)
        .map(|op| {
            let mut op = op.clone();
            if op.return_us.is_some_and(|r| r > time_us) {
                (op.output, op.return_us) = (None, None);
            }
            op
        })
        .collect()
}

/// Narrows a non-linearizable key history to the shortest prefix in time
/// that is already non-linearizable. Prefixes grow monotonically in what
/// they forbid (a linearization of a longer prefix, cut at the shorter
/// one's end, linearizes the shorter one), so a binary search over return
/// times finds it. If time runs out, the whole history is returned.
fn shortest_failing_prefix(ops: Vec<Operation>, deadline: Instant) -> Vec<Operation> {
    let mut return_times: Vec<u64> = ops
        .iter()
        .filter(|op| op.is_known())
        .filter_map(|op| op.return_us)
        .collect();
    return_times.sort_unstable();
    return_times.dedup();
    // Invariant: the prefix at return_times[high] fails (the last one is the
    // whole known history); every prefix before return_times[low] passes.
    let (mut low, mut high) = (0, return_times.len().saturating_sub(1));
    while low < high {
        let middle = (low + high) / 2;
        match search::linearizable(
            &prefix_at(&ops, return_times[middle]),
            deadline,
            MAX_CACHE_ENTRIES,
        ) {
            search::Outcome::NotLinearizable => high = middle,
            search::Outcome::Linearizable => low = middle + 1,
            search::Outcome::Timeout => return ops,
        }
    }
    match return_times.get(high) {
        Some(&end_us) => ops.into_iter().filter(|op| op.call_us <= end_us).collect(),
        None => ops,
    }
}

/// A history file that cannot be read.
#[derive(Debug)]
pub enum HistoryError {
    Io(std::io::Error),
    /// Line `line` (from 1) is not an operation.
    Parse {
        line: usize,
        reason: String,
    },
    TooLong,
}

impl fmt::Display for HistoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HistoryError::Io(e) => write!(f, "cannot read the history: {e}"),
            HistoryError::Parse { line, reason } => write!(f, "history line {line}: {reason}"),
            HistoryError::TooLong => {
                write!(f, "the history has more than {MAX_HISTORY_OPS} operations")
            }
        }
    }
}

impl std::error::Error for HistoryError {}

/// Writes one operation per line, as JSON.
pub fn write_history_jsonl(mut out: impl Write, history: &[Operation]) -> std::io::Result<()> {
    for op in history {
        serde_json::to_writer(&mut out, op)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Reads what `write_history_jsonl` wrote. Blank lines are skipped.
pub fn read_history_jsonl(input: impl BufRead) -> Result<Vec<Operation>, HistoryError> {
    let mut history = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line.map_err(HistoryError::Io)?;
        if line.trim().is_empty() {
            continue;
        }
        if history.len() == MAX_HISTORY_OPS {
            return Err(HistoryError::TooLong);
        }
        let op = serde_json::from_str(&line).map_err(|e| HistoryError::Parse {
            line: i + 1,
            reason: e.to_string(),
        })?;
        history.push(op);
    }
    Ok(history)
}

#[cfg(test)]
mod tests;
