//! The apply thread: the one owner of the KV state machine. It consumes the
//! node's `ApplyTask`s in order, applies committed commands, answers the
//! requests waiting on them (writes when their entry applies, reads when
//! their ReadIndex has been applied), and takes a snapshot when the log
//! outgrows its threshold.
//!
//! With the storage engine (a server), each apply task's entries are written
//! in one atomic engine batch (data, sessions, applied index) without fsync:
//! the WAL holds them. "Taking a snapshot" is then a durable checkpoint of the
//! engine (work bounded by the log written since the last one, not by the
//! data set), after which the event loop may drop the log up to the applied
//! index; no bytes of the data set are copied. When a follower needs the
//! state itself, the node's snapshot sender streams a consistent view of the
//! engine (`node/snapshot.rs`, `snapshot_transfer.rs`), off the Raft threads;
//! when this node receives one, the apply thread swaps the received engine in
//! (`Applier::install_received`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::backup_source::{EngineSlot, LeasedView};
use super::engine::{self, Engine};
use super::redis_ops::execute_point_reads;
use super::state_machine::{ApplyOutcome, KvOptions, KvStateMachine};
use super::waiters::{Waiter, Waiters, NOT_LEADER_NOTHING_PROPOSED};
use crate::node::{ApplyTask, InstallReceived, NodeHandle};
use crate::proto::kvstore::ErrorCode;
use crate::raft::{Entry, EntryKind, ProposeError, Snapshot};
use crate::rpc::ReplyBatch;

/// How often expired waiters are answered with TIMEOUT.
const EXPIRY_SWEEP_MS: u64 = 20;
/// Tasks handled under one [`ReplyBatch`]: bounds how long a reply waits for
/// the batch's single write.
const MAX_TASKS_PER_BATCH: usize = 64;
/// How long a swap waits for readers of the old engine (backups, snapshot senders) to let go.
const RETIRE_TIMEOUT_MS: u64 = 10_000;
/// A snapshot request the event loop has not acted on is repeated after this.
const SNAPSHOT_RETRY_MS: u64 = 1000;
/// Applied entries wait at most about this long in memory before they are written to the
/// engine in one batch (see `commit_if_due`).
const COMMIT_INTERVAL_MS: u64 = 10;

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
    /// The engine's block cache, for an engine rebuilt from a leader's snapshot.
    engine_cache_bytes: u64,
    /// When the first entry not yet committed to the engine was applied.
    uncommitted_since: Option<Instant>,
    /// `COMMIT_INTERVAL_MS` (tests change it).
    commit_interval: Duration,
    /// The engine for readers on other threads (backups); kept up to date across restores.
    engine_slot: Arc<EngineSlot>,
}

impl Applier {
    pub fn new(
        node: NodeHandle,
        tasks: Receiver<ApplyTask>,
        waiters: Arc<Waiters>,
        machine: KvStateMachine,
        snapshot_threshold_bytes: u64,
        engine_cache_bytes: u64,
    ) -> Applier {
        let options = *machine.options();
        let engine_slot = Arc::new(EngineSlot::holding(machine.engine().cloned()));
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
            engine_cache_bytes,
            engine_slot,
            uncommitted_since: None,
            commit_interval: Duration::from_millis(COMMIT_INTERVAL_MS),
        }
    }

    /// Shares the engine with readers on other threads through `slot` (backups).
    pub fn with_engine_slot(mut self, slot: Arc<EngineSlot>) -> Applier {
        slot.set(self.machine.engine().cloned());
        self.engine_slot = slot;
        self
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
            if let Err(error) = self.commit_if_due() {
                self.node.stop_with_error(error);
                break;
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
                    self.apply(entry)?;
                }
                crate::metrics::apply_done(self.node.id(), count, started.elapsed());
                // Written to the engine by `commit_if_due`, with the tasks that follow.
                self.uncommitted_since.get_or_insert(started);
                self.serve_reads()?;
                self.maybe_snapshot()?;
            }
            ApplyTask::Restore(snapshot) => self.restore(snapshot)?,
            ApplyTask::InstallReceived(install) => self.install_received(install)?,
            ApplyTask::ReadReady { token, index } => {
                self.reads.entry(index).or_default().push(token);
                self.serve_reads()?;
            }
            ApplyTask::SteppedDown { term, hint } => self.stepped_down(term, hint),
        }
        Ok(())
    }

    /// Writes what was applied to the engine — data, sessions and applied index in one
    /// atomic batch, not fsynced — once the oldest of it has waited `COMMIT_INTERVAL_MS`.
    ///
    /// Why not one batch per task: each engine commit has a fixed cost (a journal record, the
    /// metadata rows, every active client's session row), and under load a task holds only a
    /// few entries; batching tasks for a few milliseconds writes each hot key and session
    /// once per batch. Nothing waits for this commit: replies and reads go out at once
    /// (reads see the overlay), and the WAL holds every entry not yet in the engine, so a
    /// crash replays them from the engine's applied index. The overlay is bounded by
    /// `Store::batch_is_full`, and a durable checkpoint (`maybe_snapshot`) commits it first.
    fn commit_if_due(&mut self) -> Result<(), String> {
        let Some(since) = self.uncommitted_since else {
            return Ok(());
        };
        if since.elapsed() < self.commit_interval {
            return Ok(());
        }
        self.commit_now()
    }

    /// Writes what was applied and is not yet in the engine, now (one batch, not fsynced).
    fn commit_now(&mut self) -> Result<(), String> {
        self.uncommitted_since = None;
        if !self.machine.has_uncommitted() {
            return Ok(());
        }
        self.machine
            .commit_batch(false)
            .map_err(|e| format!("committing to the engine: {e}"))
    }

    /// This node stopped leading `term`. Writes it proposed in `term` or
    /// before may or may not commit: they are answered NOT_LEADER, and the
    /// clerk retries with the same (client, seq) at the new leader, whose
    /// sessions make that safe. Writes proposed in a later term (the notice
    /// can come after this node was elected again) are left to be answered
    /// when their entries apply: failing them would say "not applied" of
    /// writes that do commit. Reads are all failed, as a read is always safe
    /// to retry and a barrier of the old term will never be served.
    fn stepped_down(&mut self, term: u64, hint: u64) {
        let lost: Vec<u64> = self
            .proposed
            .iter()
            .filter(|(_, &(proposed_in, _))| proposed_in <= term)
            .map(|(&index, _)| index)
            .collect();
        for index in lost {
            let (_, token) = self.proposed.remove(&index).expect("present");
            if let Some(waiter) = self.waiters.take(token) {
                waiter.fail(ErrorCode::NOT_LEADER, hint, "leadership changed; retry");
            }
        }
        self.reads.clear();
        for (_, waiter) in self.waiters.take_reads() {
            waiter.fail(ErrorCode::NOT_LEADER, hint, "leadership changed; retry");
        }
    }

    fn apply(&mut self, entry: Entry) -> Result<(), String> {
        // A conf-change entry is the core's business: for the state machine
        // it is a no-op that advances the applied index.
        let data: &[u8] = match entry.kind {
            EntryKind::ConfChange => &[],
            EntryKind::Normal => &entry.data,
        };
        let outcome = self
            .machine
            .apply_checked(entry.index, data)
            .map_err(|e| format!("applying entry {}: {e}", entry.index))?;
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
            return Ok(());
        };
        let Some(waiter) = self.waiters.take(token) else {
            return Ok(());
        };
        if term != entry.term {
            // Another leader's entry took this index: ours was dropped.
            let hint = self.node.status().leader;
            waiter.fail(
                ErrorCode::NOT_LEADER,
                hint,
                "the request was lost in a leader change",
            );
            return Ok(());
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
            ApplyOutcome::Invalid { reason, .. } | ApplyOutcome::TooLarge { reason, .. } => {
                waiter.fail(ErrorCode::INVALID_ARGUMENT, 0, &reason)
            }
            ApplyOutcome::SessionUnknown { client_id, .. } => waiter.fail(
                ErrorCode::SESSION_EXPIRED,
                0,
                &format!(
                    "session {client_id} is not open (never opened, a wrong secret, idle \
                     longer than session_ttl_ms, or evicted past max_sessions): this request \
                     applied nothing; open a new session"
                ),
            ),
            ApplyOutcome::Noop | ApplyOutcome::AlreadyApplied => {
                waiter.fail(ErrorCode::TIMEOUT, 0, "the outcome is unknown; retry")
            }
        }
        Ok(())
    }

    fn fail(&self, token: u64, error: ErrorCode, message: &str) {
        if let Some(waiter) = self.waiters.take(token) {
            waiter.fail(error, self.node.status().leader, message);
        }
    }

    /// Answers every read whose index the state machine has reached.
    fn serve_reads(&mut self) -> Result<(), String> {
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
                        // A value the engine cannot vouch for is never served.
                        let value = self.machine.get(key).map_err(|e| e.to_string())?;
                        waiter.answer_get(value.as_deref());
                    }
                    Some(waiter @ Waiter::RedisReads { .. }) => {
                        let Waiter::RedisReads { ref ops, .. } = waiter else {
                            unreachable!()
                        };
                        // Bounded by the service (`are_point_reads`); from the applied
                        // state with its overlay, so no engine commit is needed.
                        let mut get = |key: &[u8]| self.machine.get(key).map_err(|e| e.to_string());
                        let replies = execute_point_reads(&mut get, ops)?;
                        waiter.answer_reads(&replies);
                    }
                    Some(Waiter::Barrier(tx)) => {
                        // The reader reads the engine, not the overlay: what was applied
                        // must be in the engine first (see `commit_if_due`).
                        self.commit_now()?;
                        let answer = match self.engine_slot.lease() {
                            // A view is a cheap MVCC snapshot, not a copy. The slot holds the
                            // machine's engine: only this thread swaps it.
                            Some(lease) => Ok(LeasedView::new(lease)),
                            None => Err((
                                ErrorCode::INVALID_ARGUMENT,
                                0,
                                "this node keeps its state in memory, without an engine to read"
                                    .to_string(),
                            )),
                        };
                        // A dropped receiver: the reader gave up waiting.
                        let _ = tx.send(answer);
                    }
                    Some(other) => other.fail(ErrorCode::INVALID_ARGUMENT, 0, "not a read"),
                    None => {}
                }
            }
        }
        Ok(())
    }

    fn restore(&mut self, snapshot: Snapshot) -> Result<(), String> {
        let failed = |e: &dyn std::fmt::Display| {
            format!(
                "the snapshot at index {} from the leader does not load: {e}",
                snapshot.meta.index
            )
        };
        match self.machine.engine().map(|e| e.path().to_path_buf()) {
            None => {
                self.machine = KvStateMachine::restore(&snapshot.data, self.options)
                    .map_err(|e| failed(&e))?;
            }
            // A streamed snapshot: swapped in before the core recorded it.
            Some(_) if self.machine.applied_index() >= snapshot.meta.index => {}
            Some(live) if snapshot.data.is_empty() => {
                return Err(failed(&format!(
                    "it carries no data and the engine {} is at index {}",
                    live.display(),
                    self.machine.applied_index()
                )));
            }
            Some(live) => {
                // The event loop saved the snapshot file before this task, so a crash at any
                // step below restarts from either engine and that file.
                self.retire_engine()?;
                self.machine =
                    rebuild_engine(&live, &snapshot.data, self.options, self.engine_cache_bytes)
                        .map_err(|e| failed(&e))?;
                self.engine_slot.set(self.machine.engine().cloned());
            }
        }
        self.fail_covered(snapshot.meta.index);
        self.serve_reads()
    }

    /// Proposals at or below `index` were replaced by a snapshot: their outcome is unknown.
    fn fail_covered(&mut self, index: u64) {
        let covered: Vec<u64> = self.proposed.range(..=index).map(|(&i, _)| i).collect();
        for index in covered {
            let (_, token) = self.proposed.remove(&index).expect("present");
            self.fail(token, ErrorCode::TIMEOUT, "the outcome is unknown; retry");
        }
    }

    /// Closes the live engine: readers on other threads let go first (`EngineSlot::retire`),
    /// then the state machine holding it is dropped. A placeholder in memory takes its place
    /// until the caller opens the replacement.
    fn retire_engine(&mut self) -> Result<(), String> {
        if let Err(e) = self
            .engine_slot
            .retire(Duration::from_millis(RETIRE_TIMEOUT_MS))
        {
            self.engine_slot.set(self.machine.engine().cloned());
            return Err(e);
        }
        self.uncommitted_since = None;
        let placeholder = KvStateMachine::new(self.options);
        drop(std::mem::replace(&mut self.machine, placeholder));
        Ok(())
    }

    /// A snapshot streamed from the leader arrived whole and verified in `engine.incoming`:
    /// swap it in unless this node's state is already at or past it, then let the core record
    /// it (it persists the snapshot's index, term and membership and answers the leader).
    ///
    /// Crash safety: before the swap the live engine is untouched (a restart removes the
    /// incoming one); the swap is two renames and a directory fsync (a restart puts an
    /// interrupted one back); after it, the engine is at the snapshot's index, which is
    /// committed state, while the log and hard state are still the old ones: the restarted
    /// node skips the entries at or below the engine's index and takes the snapshot again or
    /// the entries after it.
    pub fn install_received(&mut self, mut install: InstallReceived) -> Result<(), String> {
        let index = install.applied_index();
        let applied = self.machine.applied_index();
        let Some(live) = self.machine.engine().map(|e| e.path().to_path_buf()) else {
            log::warn!("a streamed snapshot reached a node without an engine; dropped");
            return Ok(());
        };
        if index > applied {
            if let Err(e) = self.retire_engine() {
                // Nothing changed; the leader sends the snapshot again.
                log::warn!("not installing the snapshot at index {index} now: {e}");
                return Ok(());
            }
            install
                .swap_in()
                .map_err(|e| format!("swapping in the snapshot at index {index}: {e}"))?;
            let engine = Engine::open(&live, self.engine_cache_bytes).map_err(|e| e.to_string())?;
            self.machine = KvStateMachine::open(engine, self.options).map_err(|e| e.to_string())?;
            self.engine_slot.set(self.machine.engine().cloned());
            log::info!(
                "node {}: installed the leader's snapshot at index {index} (was at {applied})",
                self.node.id()
            );
            self.fail_covered(index);
            self.node.snapshot_installed(install);
            return self.serve_reads();
        }
        self.node.snapshot_installed(install);
        Ok(())
    }

    /// Once the log holds more than the threshold, the state machine is
    /// snapshotted at its applied index and handed to the event loop, which
    /// stores it and trims the log.
    ///
    /// With the engine, the snapshot is the engine itself: a durable checkpoint
    /// (fsync of what was written since the last one) and an empty snapshot
    /// body; the data set is not copied.
    fn maybe_snapshot(&mut self) -> Result<(), String> {
        let status = self.node.status();
        if status.log_bytes < self.snapshot_threshold_bytes {
            return Ok(());
        }
        let applied = self.machine.applied_index();
        if let Some((index, at)) = self.snapshot_requested {
            let done = status.snapshot_index >= index;
            if !done && at.elapsed() < Duration::from_millis(SNAPSHOT_RETRY_MS) {
                return Ok(());
            }
        }
        if applied <= status.snapshot_index {
            return Ok(());
        }
        let data = if self.machine.engine().is_some() {
            // Durable before the log is compacted past `applied`.
            self.machine.commit_batch(true).map_err(|e| e.to_string())?;
            Vec::new()
        } else {
            self.machine.snapshot()
        };
        self.node.compacted(applied, data);
        self.snapshot_requested = Some((applied, Instant::now()));
        Ok(())
    }
}

/// Builds a fresh engine beside `live` from snapshot bytes, checkpoints it, swaps it in
/// (rename and directory fsync) and opens it. No engine may be open at `live`.
pub fn rebuild_engine(
    live: &std::path::Path,
    data: &[u8],
    options: KvOptions,
    cache_bytes: u64,
) -> Result<KvStateMachine, String> {
    let incoming = engine::incoming_dir(live);
    let io = |what: &str, e: std::io::Error| format!("{what} {}: {e}", incoming.display());
    if incoming.exists() {
        std::fs::remove_dir_all(&incoming).map_err(|e| io("removing", e))?;
    }
    let fresh = Engine::open(&incoming, cache_bytes).map_err(|e| e.to_string())?;
    let machine = KvStateMachine::restore_into(data, options, fresh).map_err(|e| e.to_string())?;
    drop(machine);
    engine::swap_in(live, &incoming).map_err(|e| io("swapping in", e))?;
    let engine = Engine::open(live, cache_bytes).map_err(|e| e.to_string())?;
    KvStateMachine::open(engine, options).map_err(|e| e.to_string())
}

fn refuse(waiter: Waiter, error: ProposeError) {
    match error {
        ProposeError::NotLeader { hint } => {
            waiter.fail(ErrorCode::NOT_LEADER, hint, NOT_LEADER_NOTHING_PROPOSED)
        }
        ProposeError::Overloaded => waiter.fail(
            ErrorCode::BUSY,
            0,
            "the leader holds too many uncommitted entries",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::state_machine::{encode_command, make_command, KvOp};
    use crate::proto::kvstore::{ErrorCode, PutReply};
    use crate::rpc::Responder;

    /// A node of one, for its handle: the applier asks it only for hints.
    fn single_node(dir: &std::path::Path) -> crate::node::Node {
        let (storage, restored) =
            crate::storage::DiskStorage::open(dir, crate::storage::StorageOptions::default())
                .unwrap();
        let options = crate::node::NodeOptions {
            id: 1,
            peers: vec![(1, "127.0.0.1:1".parse().unwrap())],
            tick_ms: 10,
            election_timeout_min_ms: 150,
            election_timeout_max_ms: 300,
            heartbeat_interval_ms: 30,
            max_inflight_appends: 4,
            max_append_bytes: 1 << 20,
            max_snapshot_chunk_bytes: 1 << 20,
            max_uncommitted_bytes: 1 << 20,
            proposal_queue_capacity: 16,
            max_batch_requests: 16,
            max_frame_bytes: 16 << 20,
            peer_connect_timeout_ms: 100,
            credentials: crate::rpc::Credentials::default(),
            link_filter: None,
            join: false,
            promote_max_lag_entries: 1000,
            snapshot_store: None,
            snapshot_send_bytes_per_sec: 0,
            max_catch_up_log_bytes: 0,
        };
        crate::node::Node::start(options, storage, restored)
            .unwrap()
            .0
    }

    fn put_entry(index: u64, term: u64, client_id: u64) -> Entry {
        let op = KvOp::Put {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
        };
        Entry {
            kind: Default::default(),
            index,
            term,
            data: encode_command(&make_command(client_id, 1, 0, op)),
        }
    }

    /// Issue 16, item 6: a step-down notice of term 5 that arrives after
    /// this node, leader again in term 7, proposed a write must not fail
    /// that write (its entry commits); the write of term 5 is failed.
    #[test]
    fn a_late_step_down_notice_spares_the_new_terms_writes() {
        let dir = tempfile::tempdir().unwrap();
        let node = single_node(dir.path());
        let (_tx, tasks) = crossbeam_channel::bounded(1);
        let waiters = Arc::new(Waiters::new(16));
        let machine = KvStateMachine::new(KvOptions::default());
        let mut applier = Applier::new(
            node.handle().clone(),
            tasks,
            Arc::clone(&waiters),
            machine,
            u64::MAX,
            8 << 20,
        );
        let far = Instant::now() + Duration::from_secs(60);
        let (old_write, old_reply) = Responder::<PutReply>::local();
        let (new_write, new_reply) = Responder::<PutReply>::local();
        waiters
            .insert(1, Waiter::Put(old_write), far, Duration::ZERO)
            .ok()
            .unwrap();
        waiters
            .insert(2, Waiter::Put(new_write), far, Duration::ZERO)
            .ok()
            .unwrap();
        applier
            .handle(ApplyTask::Proposed {
                token: 1,
                index: 1,
                term: 5,
            })
            .unwrap();
        applier
            .handle(ApplyTask::Proposed {
                token: 2,
                index: 2,
                term: 7,
            })
            .unwrap();
        applier
            .handle(ApplyTask::SteppedDown { term: 5, hint: 0 })
            .unwrap();
        let old = old_reply
            .try_recv()
            .expect("the term-5 write is answered")
            .unwrap();
        assert_eq!(old.header.error.enum_value(), Ok(ErrorCode::NOT_LEADER));
        assert!(
            new_reply.try_recv().is_err(),
            "the term-7 write was answered early"
        );
        // Commands without a session (NO_CLIENT): this test is about matching waiters.
        let entries = vec![put_entry(1, 7, 0), put_entry(2, 7, 0)];
        applier.handle(ApplyTask::Committed(entries)).unwrap();
        let new = new_reply
            .try_recv()
            .expect("the term-7 write is answered")
            .unwrap();
        assert_eq!(
            new.header.error.enum_value(),
            Ok(ErrorCode::OK),
            "{:?}",
            new.header
        );
        node.shutdown();
    }

    /// An applier over an engine in `dir/engine`, for a node of one in `dir/node` (no snapshot
    /// is ever due), with its waiters; the task channel is not used (tasks are handed to
    /// `handle` directly).
    fn engine_applier(dir: &std::path::Path) -> (crate::node::Node, Applier, Arc<Waiters>, Engine) {
        let node = single_node(&dir.join("node"));
        let (_, tasks) = crossbeam_channel::bounded(1);
        let waiters = Arc::new(Waiters::new(16));
        let engine = Engine::open(&dir.join("engine"), 8 << 20).unwrap();
        let machine = KvStateMachine::open(engine.clone(), KvOptions::default()).unwrap();
        let applier = Applier::new(
            node.handle().clone(),
            tasks,
            Arc::clone(&waiters),
            machine,
            u64::MAX,
            8 << 20,
        );
        (node, applier, waiters, engine)
    }

    /// Applied tasks wait in memory (reads see them) and reach the engine together, in one
    /// batch with their applied index, once the oldest has waited `COMMIT_INTERVAL_MS`.
    #[test]
    fn applied_tasks_reach_the_engine_in_one_batch_after_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let (node, mut applier, _, engine) = engine_applier(dir.path());
        applier.commit_interval = Duration::from_secs(3600);
        for index in 1..=3 {
            let entries = vec![put_entry(index, 1, 0)];
            applier.handle(ApplyTask::Committed(entries)).unwrap();
            applier.commit_if_due().unwrap();
        }
        assert_eq!(applier.machine.applied_index(), 3);
        assert_eq!(applier.machine.get(b"k").unwrap(), Some(b"v".to_vec()));
        assert_eq!(
            engine.meta().unwrap().applied_index,
            0,
            "written to the engine before the interval"
        );
        applier.commit_interval = Duration::ZERO;
        applier.commit_if_due().unwrap();
        assert_eq!(engine.meta().unwrap().applied_index, 3);
        assert_eq!(engine.get(b"k").unwrap(), Some(b"v".to_vec()));
        node.shutdown();
    }

    /// A reader's view from a read barrier (a Redis SCAN, KEYS or DBSIZE walking the engine
    /// on its connection thread) holds a lease: the apply thread does not swap the engine
    /// (install a snapshot from the leader) until the reader lets go of the view.
    #[test]
    fn a_read_barriers_view_holds_the_engine_until_the_reader_drops_it() {
        let dir = tempfile::tempdir().unwrap();
        let (node, mut applier, waiters, _) = engine_applier(dir.path());
        applier
            .handle(ApplyTask::Committed(vec![put_entry(1, 1, 0)]))
            .unwrap();
        let (view_tx, view_rx) = crossbeam_channel::bounded(1);
        let far = Instant::now() + Duration::from_secs(60);
        waiters
            .insert(1, Waiter::Barrier(view_tx), far, Duration::ZERO)
            .ok()
            .unwrap();
        applier
            .handle(ApplyTask::ReadReady { token: 1, index: 1 })
            .unwrap();
        let view = view_rx.try_recv().unwrap().ok().unwrap();
        assert_eq!(view.get(b"k").unwrap(), Some(b"v".to_vec()));
        let reader_holds = Duration::from_millis(300);
        let reader = std::thread::spawn(move || {
            std::thread::sleep(reader_holds);
            drop(view);
        });
        let started = Instant::now();
        applier.retire_engine().unwrap();
        assert!(
            started.elapsed() >= reader_holds,
            "the engine was retired after {:?}, while the reader still held its view",
            started.elapsed()
        );
        reader.join().unwrap();
        node.shutdown();
    }
}
