//! The checks of a finished history, online and offline alike: the
//! linearizability checker of `check`, the append rule (every acknowledged
//! append to an append key is in that key's final value exactly once), and
//! the narrowing of a non-linearizable key to a small witness.
//!
//! The final value of a key is the last read of it in the history (the
//! runner reads every key after the clients stopped and the cluster healed);
//! the appends checked against it are those acknowledged before that read.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::check::{self, check_appends, AppendViolation, KvInput, KvOutput, Operation, Verdict};

/// What the checks found.
#[derive(Debug)]
pub struct HistoryVerdict {
    pub linearizability: Verdict,
    /// A non-linearizable key narrowed to a smaller witness (see [`narrow`]).
    pub witness: Option<Vec<Operation>>,
    /// Append keys whose final value breaks the append rule.
    pub append_violations: Vec<(String, AppendViolation)>,
    /// The append operations of the elements those violations name, and
    /// the final read they were checked against.
    pub append_witness: Vec<Operation>,
    /// Append keys with acknowledged appends but no final read to check.
    pub unread_keys: Vec<String>,
    /// Acknowledged appends checked against final values.
    pub appends_checked: usize,
}

impl HistoryVerdict {
    /// Linearizable and every append present exactly once.
    pub fn passed(&self) -> bool {
        self.linearizability == Verdict::Linearizable
            && self.append_violations.is_empty()
            && self.unread_keys.is_empty()
    }

    /// A violation was found (as opposed to: the checker could not decide).
    pub fn violated(&self) -> bool {
        matches!(self.linearizability, Verdict::NotLinearizable { .. })
            || !self.append_violations.is_empty()
            || !self.unread_keys.is_empty()
    }
}

/// Runs every check on `history`; the linearizability search gets at most
/// `timeout`, and the narrowing of a failure at most as long again.
pub fn check_history(history: &[Operation], timeout: Duration) -> HistoryVerdict {
    let linearizability = check::check(history, timeout);
    let witness = match &linearizability {
        Verdict::NotLinearizable { ops, .. } => Some(narrow(ops, timeout)),
        _ => None,
    };
    let (append_violations, unread_keys, appends_checked) = check_final_appends(history);
    let append_witness = append_violations
        .iter()
        .flat_map(|(key, violation)| violation_ops(history, key, violation))
        .collect();
    HistoryVerdict {
        linearizability,
        witness,
        append_violations,
        append_witness,
        unread_keys,
        appends_checked,
    }
}

/// Checks each append key's last read against the appends acknowledged
/// before it. Returns the violations, the keys without a final read, and
/// how many appends were checked.
fn check_final_appends(
    history: &[Operation],
) -> (Vec<(String, AppendViolation)>, Vec<String>, usize) {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in history {
        by_key.entry(op.input.key()).or_default().push(op);
    }
    let (mut violations, mut unread, mut checked) = (Vec::new(), Vec::new(), 0);
    for (key, mut ops) in by_key {
        if !ops
            .iter()
            .any(|op| matches!(op.input, KvInput::Append { .. }))
        {
            continue;
        }
        ops.sort_by_key(|op| op.call_us);
        let final_read = ops
            .iter()
            .rev()
            .find_map(|op| match (&op.output, op.return_us) {
                (Some(KvOutput::Get { value }), Some(_)) => Some((op.call_us, value.clone())),
                _ => None,
            });
        // Each client runs one operation at a time, so call order is each
        // client's append order.
        let acked_before = |before_us: u64| -> Vec<(u64, String)> {
            ops.iter()
                .filter(|op| op.output == Some(KvOutput::Append))
                .filter(|op| op.return_us.is_some_and(|r| r < before_us))
                .filter_map(|op| match &op.input {
                    KvInput::Append { value, .. } => Some((op.client_id, value.clone())),
                    _ => None,
                })
                .collect()
        };
        match final_read {
            None => {
                if !acked_before(u64::MAX).is_empty() {
                    unread.push(key.to_string());
                }
            }
            Some((read_us, value)) => {
                let acked = acked_before(read_us);
                checked += acked.len();
                if let Err(violation) = check_appends(value.as_deref().unwrap_or(""), &acked) {
                    violations.push((key.to_string(), violation));
                }
            }
        }
    }
    (violations, unread, checked)
}

/// The longest the narrowing spends on one candidate history.
const MAX_CANDIDATE_CHECK: Duration = Duration::from_secs(2);

/// The appends of the elements `violation` names, and the last read of
/// `key` (the final value).
fn violation_ops(history: &[Operation], key: &str, violation: &AppendViolation) -> Vec<Operation> {
    let elements: Vec<&str> = match violation {
        AppendViolation::Missing { element, .. } | AppendViolation::Duplicated { element, .. } => {
            vec![element]
        }
        AppendViolation::OutOfOrder {
            element, earlier, ..
        } => vec![earlier, element],
    };
    let mut ops: Vec<Operation> = history
        .iter()
        .filter(|op| match &op.input {
            KvInput::Append { key: k, value } => k == key && elements.contains(&value.as_str()),
            _ => false,
        })
        .cloned()
        .collect();
    let final_read = history
        .iter()
        .filter(|op| matches!(&op.input, KvInput::Get { key: k } if k == key))
        .filter(|op| op.output.is_some())
        .max_by_key(|op| op.call_us);
    ops.extend(final_read.cloned());
    ops
}

/// Whether an operation cannot change the key: a known get, or a known
/// compare-and-swap that did not swap.
pub fn is_read_only(op: &Operation) -> bool {
    op.return_us.is_some()
        && matches!(
            op.output,
            Some(KvOutput::Get { .. }) | Some(KvOutput::Cas { swapped: false, .. })
        )
}

/// Narrows a non-linearizable history of one key by leaving out read-only
/// operations while it stays non-linearizable (delta debugging over the
/// reads, within `budget`). This is sound: if a history with fewer reads
/// admits no linearization, adding reads back cannot create one, since a
/// read changes no state. Writes are all kept: leaving one out could turn a
/// legal read into an illegal one. The result is still a failing history.
pub fn narrow(ops: &[Operation], budget: Duration) -> Vec<Operation> {
    let deadline = Instant::now() + budget;
    // A candidate the checker cannot decide quickly (fewer reads constrain
    // the order of concurrent writes less, so the search can explode) is
    // treated as passing: its reads stay.
    let fails = |candidate: &[Operation]| -> Option<bool> {
        let left = deadline.checked_duration_since(Instant::now())?;
        match check::check(candidate, left.min(MAX_CANDIDATE_CHECK)) {
            Verdict::NotLinearizable { .. } => Some(true),
            Verdict::Linearizable | Verdict::Timeout => Some(false),
        }
    };
    let mut kept: Vec<Operation> = ops.to_vec();
    let mut chunk = kept.iter().filter(|op| is_read_only(op)).count().max(1);
    while chunk >= 1 {
        let reads: Vec<usize> = (0..kept.len())
            .filter(|&i| is_read_only(&kept[i]))
            .collect();
        if reads.is_empty() {
            break;
        }
        let mut removed_any = false;
        for group in reads.chunks(chunk).rev() {
            let candidate: Vec<Operation> = kept
                .iter()
                .enumerate()
                .filter(|(i, _)| !group.contains(i))
                .map(|(_, op)| op.clone())
                .collect();
            match fails(&candidate) {
                Some(true) => {
                    kept = candidate;
                    removed_any = true;
                    break;
                }
                Some(false) => {}
                None => return kept,
            }
        }
        if !removed_any {
            if chunk == 1 {
                break;
            }
            chunk = chunk.div_ceil(2);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(
        client: u64,
        input: KvInput,
        output: KvOutput,
        call_us: u64,
        return_us: u64,
    ) -> Operation {
        Operation {
            client_id: client,
            input,
            call_us,
            output: Some(output),
            return_us: Some(return_us),
        }
    }

    fn append(client: u64, value: &str, call_us: u64, return_us: u64) -> Operation {
        let input = KvInput::Append {
            key: "a0".into(),
            value: value.into(),
        };
        op(client, input, KvOutput::Append, call_us, return_us)
    }

    fn get(value: Option<&str>, call_us: u64, return_us: u64) -> Operation {
        let input = KvInput::Get { key: "a0".into() };
        let output = KvOutput::Get {
            value: value.map(str::to_string),
        };
        op(9, input, output, call_us, return_us)
    }

    #[test]
    fn a_stale_read_is_narrowed_to_the_writes_and_the_one_bad_read() {
        let history = vec![
            append(1, "x 1 1 y", 0, 10),
            get(Some("x 1 1 y"), 20, 30),
            get(Some("x 1 1 y"), 21, 31),
            append(2, "x 2 1 y", 40, 50),
            get(Some("x 1 1 yx 2 1 y"), 60, 70),
            get(Some("x 1 1 y"), 80, 90),
            get(Some("x 1 1 yx 2 1 y"), 95, 99),
        ];
        let verdict = check_history(&history, Duration::from_secs(10));
        assert!(verdict.violated());
        let witness = verdict.witness.expect("a witness");
        let reads: Vec<u64> = witness
            .iter()
            .filter(|op| is_read_only(op))
            .map(|op| op.call_us)
            .collect();
        assert_eq!(reads, vec![80], "{witness:#?}");
        assert_eq!(witness.len(), 3);
    }

    #[test]
    fn lost_and_duplicated_appends_are_found_in_the_final_read() {
        let lost = vec![
            append(1, "x 1 1 y", 0, 10),
            append(1, "x 1 2 y", 20, 30),
            get(Some("x 1 1 y"), 100, 110),
        ];
        let verdict = check_history(&lost, Duration::from_secs(10));
        assert_eq!(verdict.append_violations.len(), 1);
        // The lost append and the final read it is missing from.
        let named: Vec<u64> = verdict.append_witness.iter().map(|op| op.call_us).collect();
        assert_eq!(named, vec![20, 100]);
        assert!(verdict.violated());
        let fine = vec![append(1, "x 1 1 y", 0, 10), get(Some("x 1 1 y"), 100, 110)];
        let verdict = check_history(&fine, Duration::from_secs(10));
        assert!(verdict.passed(), "{verdict:?}");
        assert_eq!(verdict.appends_checked, 1);
        let unread = vec![append(1, "x 1 1 y", 0, 10)];
        assert_eq!(
            check_history(&unread, Duration::from_secs(10)).unread_keys,
            vec!["a0".to_string()]
        );
    }
}
