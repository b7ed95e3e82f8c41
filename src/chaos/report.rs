//! The text a run or an offline check prints: seed, faults with their times,
//! op counts, recovery, and the verdict, with the witness of a violation
//! kept short (the full witness goes to a file beside the history).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::runner::{Outcome, RunReport};
use super::verdict::{is_read_only, HistoryVerdict};
use crate::check::{write_history_jsonl, Operation, Verdict};

/// How the report describes one stall.
const STALL_LINE: &str = "64 pipelined reads of 300 kB left unread for 3 s";

/// The most witness operations printed; the rest are in the witness file.
const MAX_PRINTED_OPS: usize = 24;

/// The report of a run, as printed by `chaos`.
pub fn run_text(report: &RunReport) -> String {
    let options = &report.options;
    let mut text = String::new();
    let faults: Vec<&str> = options.faults.iter().map(|k| k.name()).collect();
    let _ = writeln!(
        text,
        "seed {} ({} nodes, {} clients, {} s, {} keys, faults {})",
        options.seed,
        options.nodes,
        options.clients,
        options.duration.as_secs_f64(),
        options.keys,
        faults.join(",")
    );
    let _ = writeln!(text, "faults injected ({}):", report.faults.len());
    for fault in &report.faults {
        let _ = writeln!(
            text,
            "  {:>8.3}s - {:>8.3}s  {}",
            fault.start_ms as f64 / 1e3,
            fault.end_ms as f64 / 1e3,
            fault.description
        );
    }
    let counts = &report.counts;
    let _ = writeln!(
        text,
        "ops: {} ok, {} failed, {} unknown (timed out); {} direct reads unanswered; \
         {} frames dropped by the proxies",
        counts.ok, counts.failed, counts.unknown, counts.direct_unanswered, report.frames_dropped
    );
    let kept = report.stalls.iter().filter(|s| s.leader_kept()).count();
    let _ = writeln!(
        text,
        "slow reader: {} stalls of {STALL_LINE}, the leader kept its term through {kept}; \
         leader changes it caused: {}",
        report.stalls.len(),
        report.slow_reader_leader_changes
    );
    match &report.recovery {
        Ok(after) => {
            let _ = writeln!(
                text,
                "recovery: a write was accepted {} ms after healing (budget {} ms)",
                after.as_millis(),
                options.recovery_budget.as_millis()
            );
        }
        Err(reason) => {
            let _ = writeln!(text, "recovery: FAILED: {reason}");
        }
    }
    if let Some(crash) = &report.crashed_node {
        let _ = writeln!(text, "crash: {crash}");
    }
    text.push_str(&verdict_text(&report.verdict, &options.history));
    let _ = writeln!(
        text,
        "history: {} ({} operations; re-check with `chaos --check-history FILE`)",
        options.history.display(),
        report.history_ops
    );
    if report.work_dir_kept {
        let _ = writeln!(text, "work dir (logs, data): {}", report.work_dir.display());
    }
    let outcome = match report.outcome() {
        Outcome::Passed => {
            "PASS: linearizable, no acknowledged append lost or duplicated, recovered"
        }
        Outcome::Violation => "FAIL: violation found",
        Outcome::Undecided => "UNDECIDED: the checker ran out of time",
    };
    let _ = writeln!(text, "verdict: {outcome}");
    text
}

/// The checks' findings; a witness is written beside `history`.
pub fn verdict_text(verdict: &HistoryVerdict, history: &Path) -> String {
    let mut text = String::new();
    match &verdict.linearizability {
        Verdict::Linearizable => text.push_str("linearizability: linearizable\n"),
        Verdict::Timeout => {
            text.push_str("linearizability: undecided (the checker ran out of time)\n")
        }
        Verdict::NotLinearizable { key, ops } => {
            let witness = verdict.witness.as_deref().unwrap_or(ops);
            let _ = writeln!(
                text,
                "linearizability: NOT LINEARIZABLE on key {key:?}: the shortest failing prefix \
                 has {} operations; narrowed to {} (every write kept, reads left out while it \
                 still fails)",
                ops.len(),
                witness.len()
            );
            text.push_str(&witness_text(witness));
            let path = witness_path(history);
            let saved = std::fs::File::create(&path)
                .and_then(|file| write_history_jsonl(std::io::BufWriter::new(file), witness));
            match saved {
                Ok(()) => {
                    let _ = writeln!(text, "  witness saved to {}", path.display());
                }
                Err(e) => {
                    let _ = writeln!(text, "  witness not saved to {}: {e}", path.display());
                }
            }
        }
    }
    if verdict.append_violations.is_empty() && verdict.unread_keys.is_empty() {
        let _ = writeln!(
            text,
            "appends: {} acknowledged appends, each present exactly once in its key's final value",
            verdict.appends_checked
        );
    }
    for (key, violation) in &verdict.append_violations {
        let _ = writeln!(text, "appends: VIOLATION on key {key:?}: {violation}");
    }
    if !verdict.append_witness.is_empty() {
        text.push_str("  the appends named, and the final read:\n");
        for op in &verdict.append_witness {
            let _ = writeln!(text, "    {}", op_line(op));
        }
    }
    for key in &verdict.unread_keys {
        let _ = writeln!(text, "appends: key {key:?} has no final read to check");
    }
    text
}

/// Where the witness of a violation goes: `<history>.witness.jsonl`.
pub fn witness_path(history: &Path) -> PathBuf {
    let mut name = history.as_os_str().to_owned();
    name.push(".witness.jsonl");
    PathBuf::from(name)
}

/// The witness's reads (what no order of the writes explains), then the
/// writes called last before the last of those reads; at most
/// `MAX_PRINTED_OPS` lines, the rest being in the witness file.
fn witness_text(witness: &[Operation]) -> String {
    let (reads, writes): (Vec<&Operation>, Vec<&Operation>) =
        witness.iter().partition(|op| is_read_only(op));
    let last_read_us = reads.iter().map(|op| op.call_us).max().unwrap_or(u64::MAX);
    let earlier_writes: Vec<&Operation> = writes
        .into_iter()
        .filter(|op| op.call_us <= last_read_us)
        .collect();
    let shown_reads = &reads[reads.len().saturating_sub(MAX_PRINTED_OPS / 2)..];
    let room = MAX_PRINTED_OPS - shown_reads.len();
    let shown_writes = &earlier_writes[earlier_writes.len().saturating_sub(room)..];
    let mut text = String::new();
    let _ = writeln!(
        text,
        "  reads in the witness ({}, the last {} shown):",
        reads.len(),
        shown_reads.len()
    );
    for op in shown_reads {
        let _ = writeln!(text, "    {}", op_line(op));
    }
    let _ = writeln!(
        text,
        "  writes called before the last of them ({}, the last {} shown):",
        earlier_writes.len(),
        shown_writes.len()
    );
    for op in shown_writes {
        let _ = writeln!(text, "    {}", op_line(op));
    }
    text
}

/// One operation as `[call .. return] client c: input -> output`.
pub fn op_line(op: &Operation) -> String {
    let returned = op
        .return_us
        .map_or("?".to_string(), |r| format!("{:.6}", r as f64 / 1e6));
    let output = op.output.as_ref().map_or("unknown".to_string(), |o| {
        shortened(&serde_json::to_string(o).unwrap_or_default())
    });
    let input = shortened(&serde_json::to_string(&op.input).unwrap_or_default());
    format!(
        "[{:.6}s .. {returned}s] client {}: {input} -> {output}",
        op.call_us as f64 / 1e6,
        op.client_id
    )
}

/// The most characters of a value shown; values of append keys grow long,
/// and what changed last is at their end.
const MAX_SHOWN_CHARS: usize = 160;

/// `text`, or its end after an ellipsis when it is long.
fn shortened(text: &str) -> String {
    let chars = text.chars().count();
    if chars <= MAX_SHOWN_CHARS {
        return text.to_string();
    }
    let tail: String = text.chars().skip(chars - MAX_SHOWN_CHARS).collect();
    format!("({chars} chars) ...{tail}")
}
