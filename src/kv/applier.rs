//! The apply thread: the one owner of the KV state machine. It consumes the
//! node's `ApplyTask`s in order, applies committed commands, answers the
//! requests waiting on them (writes when their entry applies, reads when
//! their ReadIndex has been applied), and takes a snapshot when the log
//! outgrows its threshold.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::state_machine::{ApplyOutcome, KvOptions, KvStateMachine};
use super::waiters::{Waiter, Waiters};
use crate::node::{ApplyTask, NodeHandle};
use crate::proto::kvstore::ErrorCode;
use crate::raft::{Entry, ProposeError, Snapshot};
use crate::rpc::ReplyBatch;

/// How often expired waiters are answered with TIMEOUT.
const EXPIRY_SWEEP_MS: u64 = 20;
/// Tasks handled under one [`ReplyBatch`]: bounds how long a reply waits for
/// the batch's single write.
const MAX_TASKS_PER_BATCH: usize = 64;
/// A snapshot request the event loop has not acted on is repeated after this.
const SNAPSHOT_RETRY_MS: u64 = 1000;

pub struct Applier {
    pub node: NodeHandle,
    pub tasks: Receiver<ApplyTask>,
    pub waiters: Arc<Waiters>,
    pub machine: KvStateMachine,
    pub options: KvOptions,
    pub snapshot_threshold_bytes: u64,
    /// Writes in the log, by index: (term of the entry, token of the waiter).
    proposed: BTreeMap<u64, (u64, u64)>,
    /// Reads whose barrier passed, by the index they wait for.
    reads: BTreeMap<u64, Vec<u64>>,
    snapshot_requested: Option<(u64, Instant)>,
}

impl Applier {
    pub fn new(
        node: NodeHandle,
        tasks: Receiver<ApplyTask>,
        waiters: Arc<Waiters>,
        machine: KvStateMachine,
        snapshot_threshold_bytes: u64,
    ) -> Applier {
        let options = *machine.options();
        Applier {
            node,
            tasks,
            waiters,
            machine,
            options,
            snapshot_threshold_bytes,
            proposed: BTreeMap::new(),
            reads: BTreeMap::new(),
            snapshot_requested: None,
        }
    }

    pub fn run(mut self) {
        let mut next_sweep = Instant::now();
        loop {
            match self
                .tasks
                .recv_timeout(Duration::from_millis(EXPIRY_SWEEP_MS))
            {
                Ok(task) => {
                    if let Err(error) = self.handle_batch(task) {
                        self.node.stop_with_error(error);
                        break;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if now >= next_sweep {
                next_sweep = now + Duration::from_millis(EXPIRY_SWEEP_MS);
                for (_, waiter) in self.waiters.take_expired(now) {
                    waiter.fail(ErrorCode::TIMEOUT, 0, "timed out; the outcome is unknown");
                }
            }
        }
        for (_, waiter) in self.waiters.take_all() {
            waiter.fail(ErrorCode::SHUTTING_DOWN, 0, "the node is shutting down");
        }
    }

    /// Handles `first` and whatever tasks are already queued behind it (at
    /// most [`MAX_TASKS_PER_BATCH`]), with their replies coalesced: every
    /// connection gets one write for all of its answers.
    fn handle_batch(&mut self, first: ApplyTask) -> Result<(), String> {
        let _replies = ReplyBatch::begin();
        let result = self.handle_queued(first);
        self.waiters.notify_room();
        result
    }

    fn handle_queued(&mut self, first: ApplyTask) -> Result<(), String> {
        self.handle(first)?;
        for _ in 1..MAX_TASKS_PER_BATCH {
            match self.tasks.try_recv() {
                Ok(task) => self.handle(task)?,
                Err(_) => break,
            }
        }
        Ok(())
    }

    fn handle(&mut self, task: ApplyTask) -> Result<(), String> {
        match task {
            ApplyTask::Proposed { token, index, term } => {
                self.proposed.insert(index, (term, token));
            }
            ApplyTask::Refused { token, error } => {
                if let Some(waiter) = self.waiters.take(token) {
                    refuse(waiter, error);
                }
            }
            ApplyTask::Committed(entries) => {
                let (started, count) = (Instant::now(), entries.len());
                for entry in entries {
                    self.apply(entry);
                }
                crate::metrics::apply_done(self.node.id(), count, started.elapsed());
                self.serve_reads();
                self.maybe_snapshot();
            }
            ApplyTask::Restore(snapshot) => self.restore(snapshot)?,
            ApplyTask::ReadReady { token, index } => {
                self.reads.entry(index).or_default().push(token);
                self.serve_reads();
            }
            ApplyTask::SteppedDown { hint, .. } => {
                // Requests this node accepted as leader may or may not
                // commit; the clerk retries with the same (client, seq)
                // at the new leader, whose sessions make that safe.
                self.proposed.clear();
                self.reads.clear();
                for (_, waiter) in self.waiters.take_all() {
                    waiter.fail(ErrorCode::NOT_LEADER, hint, "leadership changed; retry");
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, entry: Entry) {
        let outcome = self.machine.apply(entry.index, &entry.data);
        // Anything proposed below this index can no longer be applied.
        while let Some((&index, _)) = self.proposed.first_key_value() {
            if index >= entry.index {
                break;
            }
            let (_, token) = self.proposed.remove(&index).expect("present");
            self.fail(
                token,
                ErrorCode::NOT_LEADER,
                "the request was lost in a leader change",
            );
        }
        let Some((term, token)) = self.proposed.remove(&entry.index) else {
            return;
        };
        let Some(waiter) = self.waiters.take(token) else {
            return;
        };
        if term != entry.term {
            // Another leader's entry took this index: ours was dropped.
            let hint = self.node.status().leader;
            return waiter.fail(
                ErrorCode::NOT_LEADER,
                hint,
                "the request was lost in a leader change",
            );
        }
        match outcome {
            ApplyOutcome::Applied { reply, .. } | ApplyOutcome::Duplicate { reply, .. } => {
                waiter.answer_write(reply)
            }
            ApplyOutcome::Stale { seq, last_seq, .. } => waiter.fail(
                ErrorCode::INVALID_ARGUMENT,
                0,
                &format!("seq {seq} is older than this client's last request {last_seq}"),
            ),
            ApplyOutcome::Invalid { reason, .. } => {
                waiter.fail(ErrorCode::INVALID_ARGUMENT, 0, &reason)
            }
            ApplyOutcome::Noop | ApplyOutcome::AlreadyApplied => {
                waiter.fail(ErrorCode::TIMEOUT, 0, "the outcome is unknown; retry")
            }
        }
    }

    fn fail(&self, token: u64, error: ErrorCode, message: &str) {
        if let Some(waiter) = self.waiters.take(token) {
            waiter.fail(error, self.node.status().leader, message);
        }
    }

    /// Answers every read whose index the state machine has reached.
    fn serve_reads(&mut self) {
        let applied = self.machine.applied_index();
        while let Some(entry) = self.reads.first_entry() {
            if *entry.key() > applied {
                break;
            }
            for token in entry.remove() {
                match self.waiters.take(token) {
                    Some(waiter @ Waiter::Get { .. }) => {
                        let Waiter::Get { ref key, .. } = waiter else {
                            unreachable!()
                        };
                        let value = self.machine.get(key).map(<[u8]>::to_vec);
                        waiter.answer_get(value.as_deref());
                    }
                    Some(other) => other.fail(ErrorCode::INVALID_ARGUMENT, 0, "not a read"),
                    None => {}
                }
            }
        }
    }

    fn restore(&mut self, snapshot: Snapshot) -> Result<(), String> {
        self.machine = KvStateMachine::restore(&snapshot.data, self.options).map_err(|e| {
            format!(
                "the snapshot at index {} from the leader does not load: {e}",
                snapshot.meta.index
            )
        })?;
        let covered: Vec<u64> = self
            .proposed
            .range(..=snapshot.meta.index)
            .map(|(&i, _)| i)
            .collect();
        for index in covered {
            let (_, token) = self.proposed.remove(&index).expect("present");
            self.fail(token, ErrorCode::TIMEOUT, "the outcome is unknown; retry");
        }
        self.serve_reads();
        Ok(())
    }

    /// Once the log holds more than the threshold, the state machine is
    /// snapshotted at its applied index and handed to the event loop, which
    /// stores it and trims the log.
    fn maybe_snapshot(&mut self) {
        let status = self.node.status();
        if status.log_bytes < self.snapshot_threshold_bytes {
            return;
        }
        let applied = self.machine.applied_index();
        if let Some((index, at)) = self.snapshot_requested {
            let done = status.snapshot_index >= index;
            if !done && at.elapsed() < Duration::from_millis(SNAPSHOT_RETRY_MS) {
                return;
            }
        }
        if applied <= status.snapshot_index {
            return;
        }
        self.node.compacted(applied, self.machine.snapshot());
        self.snapshot_requested = Some((applied, Instant::now()));
    }
}

fn refuse(waiter: Waiter, error: ProposeError) {
    match error {
        ProposeError::NotLeader { hint } => {
            waiter.fail(ErrorCode::NOT_LEADER, hint, "not the leader")
        }
        ProposeError::Overloaded => waiter.fail(
            ErrorCode::BUSY,
            0,
            "the leader holds too many uncommitted entries",
        ),
    }
}
