//! The replicated key-value state machine: an ordered map from key to value,
//! plus one session per client that makes retried commands exactly-once.
//! Every replica applies the same committed log entries in the same order to
//! its own copy, and everything here is a pure function of those entries (no
//! wall clock, no randomness, no hash-order iteration), so all replicas hold
//! equal state at equal applied indexes — including which sessions exist.
//!
//! This module also owns the codec of the commands that log entries carry
//! (`proto::kvstore::Command`), so the server and the tests share one, and the
//! compact binary format of the state machine's snapshots.
//!
//! # Exactly-once sessions, and why expiring them is safe
//!
//! A clerk numbers its commands (`seq`) and retries a command with the same
//! `(client_id, seq)` until it gets an answer. The session of a client holds
//! its last applied `seq` and the reply to it: a command with that `seq` is
//! answered from the session without being applied again, and an older `seq`
//! is `Stale` (the clerk has moved on, so nobody waits for that reply).
//!
//! # Sessions are opened through the log
//!
//! A client does not choose its id. It asks for a session, and the leader
//! proposes an `OPEN_SESSION` command carrying a random secret; when that
//! entry applies, the session's id is the entry's *index*, so every replica
//! creates the same session under the same id (as LogCabin's OpenSession).
//! A write must carry both the id and the secret: a command whose
//! `(client_id, secret)` names no open session is `SessionUnknown` and
//! changes nothing, so nobody can create sessions by inventing ids (and evict
//! others with them), nor fake another client's next seq to have its write
//! answered as a duplicate without knowing that client's secret. A new
//! session starts at seq 0: its first write is seq 1.
//!
//! Sessions cannot live forever (a clerk never says goodbye), so they expire
//! by *cluster time*: the state machine's clock is the largest `stamp_ms` any
//! applied command carried. The leader stamps commands with its wall clock
//! when it proposes them, so the clock is part of the log: every replica drops
//! the same sessions at the same index (as in LogCabin). A backwards step of
//! a leader's wall clock never moves the cluster clock back; a forward jump
//! only expires sessions early. A session whose last activity is more than
//! `session_ttl_ms` behind the clock is dropped, and when an `OPEN_SESSION`
//! makes more than `max_sessions`, the least recently active session is
//! dropped (ties broken by the smaller client id), which is equally
//! deterministic. Only opening a session can evict one; writes never do.
//!
//! What a clerk risks: once its session is gone, the state machine no longer
//! knows what that clerk applied, and says so: every later command of that
//! session is `SessionUnknown` (the server's SESSION_EXPIRED), never applied
//! and never answered from a reply it no longer holds. The clerk then opens a
//! new session; a write of which an earlier attempt may have been applied is
//! reported to its caller as of unknown outcome instead of being sent again.
//!
//! # Saved replies stay small
//!
//! A session keeps one reply. Put, Append and Delete replies are a few bits.
//! A Cas reply carries the value the key had before the operation, which can
//! be as large as any value; keeping it would let `max_sessions` large values
//! hide in every snapshot. So a saved Cas reply keeps `current` only when it
//! is at most `max_saved_current_bytes` long; otherwise a retried Cas is
//! answered with `swapped` and `found` (which are exact) and `current: None`,
//! meaning "not retained". The first answer, straight from `apply`, always
//! carries the full `current`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::engine::{Engine, EngineBatch, EngineMeta};
use super::redis_ops::{self, RedisReply, RedisWrite};
use super::store::Store;

use protobuf::{Enum, EnumOrUnknown, Message};

use crate::proto::kvstore::command::Op;
use crate::proto::kvstore::Command;

/// The client id that has no session: commands with it are applied every
/// time they appear (meant for commands the servers issue themselves).
pub const NO_CLIENT: u64 = 0;

/// Tuning of the state machine. Every replica must use the same values (they
/// come from the shared cluster file), or their sessions would diverge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvOptions {
    /// A session idle for longer than this, in cluster time, is dropped.
    pub session_ttl_ms: u64,
    /// At most this many sessions are kept; the least recently active go first.
    pub max_sessions: usize,
    /// A saved Cas reply keeps `current` only up to this many bytes.
    pub max_saved_current_bytes: usize,
    /// The most bytes a value may have, however it is produced (Put, Append,
    /// Cas): a write that would make a longer one is rejected and changes
    /// nothing. Keeps every value readable (a Get reply fits in a frame)
    /// and an Append's cost bounded. The server uses half of
    /// `max_append_bytes`, the same bound its handlers check.
    pub max_value_bytes: usize,
}

impl Default for KvOptions {
    fn default() -> KvOptions {
        KvOptions {
            session_ttl_ms: 3_600_000,
            max_sessions: 10_000,
            max_saved_current_bytes: 1024,
            max_value_bytes: 512 * 1024,
        }
    }
}

/// Something malformed: a command that does not decode or a snapshot that
/// does not restore. The message is one line naming what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvError {
    Command(String),
    Snapshot(String),
    /// The storage engine failed (I/O error or damaged data): the node must stop.
    Storage(String),
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvError::Command(why) => write!(f, "invalid command: {why}"),
            KvError::Snapshot(why) => write!(f, "invalid snapshot: {why}"),
            KvError::Storage(why) => write!(f, "storage engine failed: {why}"),
        }
    }
}

impl std::error::Error for KvError {}

// ------------------------------------------------------------------ codec

/// What a command does, as a Rust value (the decoded `Command.op` and the
/// fields that op uses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvOp {
    Noop,
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Append {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        key: Vec<u8>,
    },
    Cas {
        key: Vec<u8>,
        expected: Vec<u8>,
        value: Vec<u8>,
    },
    /// A batch of Redis-protocol writes (src/kv/redis_ops.rs), applied in
    /// order as one entry.
    Redis(Vec<RedisWrite>),
    /// Opens a session whose id is the entry's index and whose secret is `secret`.
    OpenSession {
        secret: u64,
    },
}

impl KvOp {
    /// The op a decoded command asks for; an op number this build does not
    /// know is an error (a newer leader's command, or corruption).
    pub fn from_command(command: &Command) -> Result<KvOp, KvError> {
        let op = command.op.enum_value().map_err(|number| {
            KvError::Command(format!(
                "unknown op {number} (client {}, seq {})",
                command.client_id, command.seq
            ))
        })?;
        let key = || command.key.clone();
        Ok(match op {
            Op::NOOP => KvOp::Noop,
            Op::PUT => KvOp::Put {
                key: key(),
                value: command.value.clone(),
            },
            Op::APPEND => KvOp::Append {
                key: key(),
                value: command.value.clone(),
            },
            Op::DELETE => KvOp::Delete { key: key() },
            Op::CAS => KvOp::Cas {
                key: key(),
                expected: command.expected.clone(),
                value: command.value.clone(),
            },
            Op::REDIS => KvOp::Redis(
                command
                    .ops
                    .iter()
                    .map(RedisWrite::from_proto)
                    .collect::<Result<_, _>>()
                    .map_err(|why| {
                        KvError::Command(format!(
                            "{why} (client {}, seq {})",
                            command.client_id, command.seq
                        ))
                    })?,
            ),
            Op::OPEN_SESSION => KvOp::OpenSession {
                secret: command.secret,
            },
        })
    }
}

/// Builds the command a leader proposes for a write of session `client_id`
/// whose secret is `secret`.
pub fn make_session_command(
    client_id: u64,
    secret: u64,
    seq: u64,
    stamp_ms: u64,
    op: KvOp,
) -> Command {
    let mut command = make_command(client_id, seq, stamp_ms, op);
    command.secret = secret;
    command
}

/// Builds the command a leader proposes for `op` (without a session secret:
/// `OPEN_SESSION`, and commands of `NO_CLIENT`).
pub fn make_command(client_id: u64, seq: u64, stamp_ms: u64, op: KvOp) -> Command {
    let mut command = Command {
        client_id,
        seq,
        stamp_ms,
        ..Command::default()
    };
    let number = match op {
        KvOp::Noop => Op::NOOP,
        KvOp::Put { key, value } => {
            (command.key, command.value) = (key, value);
            Op::PUT
        }
        KvOp::Append { key, value } => {
            (command.key, command.value) = (key, value);
            Op::APPEND
        }
        KvOp::Delete { key } => {
            command.key = key;
            Op::DELETE
        }
        KvOp::Cas {
            key,
            expected,
            value,
        } => {
            (command.key, command.expected, command.value) = (key, expected, value);
            Op::CAS
        }
        KvOp::Redis(ops) => {
            command.ops = ops.iter().map(RedisWrite::to_proto).collect();
            Op::REDIS
        }
        KvOp::OpenSession { secret } => {
            command.secret = secret;
            Op::OPEN_SESSION
        }
    };
    command.op = EnumOrUnknown::new(number);
    command
}

/// The bytes of a log entry that carries `command`. Never empty: an entry
/// with empty data is Raft's own no-op, so even an all-default command is
/// encoded with at least its op field.
pub fn encode_command(command: &Command) -> Vec<u8> {
    let mut bytes = command
        .write_to_bytes()
        .expect("a proto3 Command without required fields always encodes");
    if bytes.is_empty() {
        // Field 1 (op), varint 0: the explicit encoding of NOOP.
        bytes = vec![0x08, Op::NOOP.value() as u8];
    }
    bytes
}

/// Decodes a log entry's data. Empty data is not a command (it is Raft's
/// no-op); the caller handles it before decoding.
pub fn decode_command(data: &[u8]) -> Result<Command, KvError> {
    Command::parse_from_bytes(data)
        .map_err(|e| KvError::Command(format!("{} bytes do not decode: {e}", data.len())))
}

// ----------------------------------------------------------- apply results

/// The answer to one applied command, for the request waiting on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandReply {
    Put,
    Append,
    Delete {
        existed: bool,
    },
    /// `current` is the value before the operation ("" for a missing key).
    /// It is `None` only in a replay of a saved reply whose `current` was too
    /// large to retain (see the module documentation).
    Cas {
        swapped: bool,
        found: bool,
        current: Option<Vec<u8>>,
    },
    /// One reply per op of a Redis batch.
    Redis(Vec<RedisReply>),
    /// A session was opened: its id (the entry's index) and secret.
    SessionOpened {
        client_id: u64,
        secret: u64,
    },
}

impl CommandReply {
    /// The copy a session keeps: the same reply, without a large `current`.
    fn to_saved(&self, max_saved_current_bytes: usize) -> CommandReply {
        match self {
            CommandReply::Cas {
                swapped,
                found,
                current,
            } => CommandReply::Cas {
                swapped: *swapped,
                found: *found,
                current: current
                    .clone()
                    .filter(|c| c.len() <= max_saved_current_bytes),
            },
            CommandReply::Redis(replies) => CommandReply::Redis(
                replies
                    .iter()
                    .map(|r| r.to_saved(max_saved_current_bytes))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
}

/// What applying one log entry did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Raft's no-op (empty data) or a NOOP command: only the applied index
    /// (and the clock) moved.
    Noop,
    /// The command was applied now; `reply` answers `(client_id, seq)`.
    Applied {
        client_id: u64,
        seq: u64,
        reply: CommandReply,
    },
    /// A retry of the client's last command: not applied again; `reply` is
    /// the one saved when it was applied.
    Duplicate {
        client_id: u64,
        seq: u64,
        reply: CommandReply,
    },
    /// Older than the client's last command; not applied, and its reply is
    /// gone. Nobody should be waiting for it.
    Stale {
        client_id: u64,
        seq: u64,
        last_seq: u64,
    },
    /// The entry's data is not a valid command. It is skipped — the index
    /// counts as applied and nothing else changes — on every replica alike,
    /// since they all hold the same bytes. `request` is `(client_id, seq)`
    /// when the bytes decoded far enough to tell.
    Invalid {
        request: Option<(u64, u64)>,
        reason: String,
    },
    /// The index is at or below the applied index (a replay after restoring
    /// a snapshot): it is already part of the state.
    AlreadyApplied,
    /// The command would make a value longer than `max_value_bytes`; it
    /// changed nothing (the session neither: a retry is judged again).
    TooLarge {
        client_id: u64,
        seq: u64,
        reason: String,
    },
    /// `(client_id, secret)` names no open session (never opened, expired,
    /// evicted, or a wrong secret): nothing changed.
    SessionUnknown { client_id: u64, seq: u64 },
}

// ------------------------------------------------------------ the machine

#[derive(Clone, Debug, PartialEq, Eq)]
struct Session {
    /// Chosen at random by the leader that proposed the `OPEN_SESSION`; every write of the
    /// session must carry it.
    secret: u64,
    /// 0 until the first write (seqs start at 1).
    last_seq: u64,
    /// The cluster clock when the client was last heard from.
    last_active_ms: u64,
    reply: CommandReply,
}

/// The key-value map and the client sessions. See the module documentation.
///
/// The map lives in a [`Store`]: the storage engine on a server, memory in unit tests. The
/// sessions (at most `max_sessions`) are also kept in memory, and every change to them is
/// written to the engine in the same batch as the data and the applied index
/// ([`KvStateMachine::commit_batch`]).
pub struct KvStateMachine {
    options: KvOptions,
    store: Store,
    sessions: BTreeMap<u64, Session>,
    /// Sessions created, changed or dropped since the last commit.
    dirty_sessions: BTreeSet<u64>,
    /// The first storage failure met while applying: the batch it spoiled is never committed,
    /// and `apply_checked` reports it, so the node stops instead of serving wrong data.
    storage_error: Option<KvError>,
    /// Invariant: holds exactly `(s.last_active_ms, id)` for every session
    /// `(id, s)`, so the first element is the next session to expire or evict.
    activity: BTreeSet<(u64, u64)>,
    /// The cluster clock: the largest `stamp_ms` applied so far.
    clock_ms: u64,
    applied_index: u64,
    /// The applied index of the last commit to the store: entries after it are applied in
    /// memory (the store's overlay, the sessions) but not yet written to the engine.
    committed_index: u64,
}

impl fmt::Debug for KvStateMachine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "KvStateMachine(applied {}, clock {} ms, {} sessions)",
            self.applied_index,
            self.clock_ms,
            self.sessions.len()
        )
    }
}

/// Equal state: the same keys, values, sessions, clock and applied index (compares the
/// snapshot encodings; meant for tests).
impl PartialEq for KvStateMachine {
    fn eq(&self, other: &KvStateMachine) -> bool {
        self.snapshot() == other.snapshot()
    }
}

impl KvStateMachine {
    /// An empty state machine whose map lives in memory (tests and simulations).
    pub fn new(options: KvOptions) -> KvStateMachine {
        KvStateMachine::with_store(options, Store::memory())
    }

    fn with_store(options: KvOptions, store: Store) -> KvStateMachine {
        KvStateMachine {
            options,
            store,
            sessions: BTreeMap::new(),
            dirty_sessions: BTreeSet::new(),
            storage_error: None,
            activity: BTreeSet::new(),
            clock_ms: 0,
            applied_index: 0,
            committed_index: 0,
        }
    }

    /// The state machine held by `engine`: reads its applied index, clock and sessions (a few
    /// rows, bounded by `max_sessions`), never the data set.
    pub fn open(engine: Engine, options: KvOptions) -> Result<KvStateMachine, KvError> {
        let storage = |e: super::engine::EngineError| KvError::Storage(e.to_string());
        let meta = engine.meta().map_err(storage)?;
        let sessions = engine.sessions().map_err(storage)?;
        let mut machine = KvStateMachine::with_store(options, Store::engine(engine));
        machine.applied_index = meta.applied_index;
        machine.committed_index = meta.applied_index;
        machine.clock_ms = meta.clock_ms;
        for (client_id, bytes) in sessions {
            let mut reader = Reader {
                bytes: &bytes,
                pos: 0,
            };
            let session = read_session(&mut reader, client_id).map_err(|e| {
                if is_session_without_secret(&bytes, client_id) {
                    return KvError::Storage(format!(
                        "the engine holds a client session ({client_id}) written by an older \
                         kvstore-raft, before sessions were opened through the log; this build \
                         cannot open that data directory (its log may hold writes of sessions \
                         this build would refuse) and there is no in-place upgrade: keep the \
                         older build for it, or start a new cluster"
                    ));
                }
                KvError::Storage(format!("stored session of client {client_id}: {e}"))
            })?;
            machine.activity.insert((session.last_active_ms, client_id));
            machine.sessions.insert(client_id, session);
        }
        Ok(machine)
    }

    /// The engine under this machine (`None` for a machine in memory).
    pub fn engine(&self) -> Option<&Engine> {
        self.store.as_engine()
    }

    pub fn options(&self) -> &KvOptions {
        &self.options
    }

    /// The value of `key`, or `None` when the key does not exist; an error when the engine
    /// cannot read it (the node must stop rather than answer).
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.store
            .get(key)
            .map_err(|e| KvError::Storage(e.to_string()))
    }

    /// A read inside `apply`: a failure is kept in `storage_error` (the batch is then never
    /// committed and `apply_checked` reports it), and the apply goes on as if the key were
    /// missing, which no one will see.
    fn read(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        match self.store.get(key) {
            Ok(value) => value,
            Err(e) => {
                self.storage_error
                    .get_or_insert(KvError::Storage(e.to_string()));
                None
            }
        }
    }

    /// The index of the last log entry applied (or restored from a snapshot).
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// The number of committed keys. Reads every key: for tests.
    pub fn len(&self) -> usize {
        let mut count = 0;
        self.store
            .for_each_committed(|_, _| count += 1)
            .expect("the store reads back");
        count
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `client_id` names an open session (for tests and diagnostics).
    pub fn has_session(&self, client_id: u64) -> bool {
        self.sessions.contains_key(&client_id)
    }

    /// The number of client sessions held.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// The cluster clock: the largest command stamp applied so far.
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms
    }

    /// [`apply`](Self::apply), then: the storage failure it met, if any (the node must stop
    /// and must not send the outcome); otherwise the outcome, with the batch committed (not
    /// durably) once it is full ([`Store::batch_is_full`]), which bounds its memory.
    pub fn apply_checked(&mut self, index: u64, data: &[u8]) -> Result<ApplyOutcome, KvError> {
        let outcome = self.apply(index, data);
        if let Some(error) = self.storage_error.clone() {
            return Err(error);
        }
        if self.store.batch_is_full() {
            self.commit_batch(false)?;
        }
        Ok(outcome)
    }

    /// Writes what was applied since the last commit — data, sessions, clock and applied
    /// index — in one atomic batch; durable (fsynced) with `durable`. Refused after a storage
    /// failure.
    pub fn commit_batch(&mut self, durable: bool) -> Result<(), KvError> {
        if let Some(error) = self.storage_error.clone() {
            return Err(error);
        }
        let mut batch = EngineBatch {
            meta: EngineMeta {
                applied_index: self.applied_index,
                clock_ms: self.clock_ms,
            },
            ..EngineBatch::default()
        };
        for client_id in std::mem::take(&mut self.dirty_sessions) {
            let encoded = self.sessions.get(&client_id).map(|session| {
                let mut out = Vec::new();
                put_session(&mut out, session);
                out
            });
            batch.sessions.insert(client_id, encoded);
        }
        self.store.commit(batch, durable).map_err(|e| {
            let error = KvError::Storage(e.to_string());
            self.storage_error = Some(error.clone());
            error
        })?;
        self.committed_index = self.applied_index;
        Ok(())
    }

    /// Whether entries were applied since the last [`commit_batch`](Self::commit_batch).
    pub fn has_uncommitted(&self) -> bool {
        self.applied_index != self.committed_index || self.store.pending_keys() > 0
    }

    /// Applies the committed log entry at `index`, whose data is `data`.
    ///
    /// Entries must come in log order: `index` is at most one past the
    /// applied index (lower indexes are ignored as `AlreadyApplied`). A gap
    /// would mean the driver lost committed entries, which is a bug, so it
    /// panics rather than let this replica diverge silently.
    pub fn apply(&mut self, index: u64, data: &[u8]) -> ApplyOutcome {
        if index <= self.applied_index {
            return ApplyOutcome::AlreadyApplied;
        }
        assert_eq!(
            index,
            self.applied_index + 1,
            "committed entries must be applied in order without gaps"
        );
        self.applied_index = index;
        if data.is_empty() {
            return ApplyOutcome::Noop;
        }
        let command = match decode_command(data) {
            Ok(command) => command,
            Err(e) => return self.invalid(index, None, e),
        };
        let request = (command.client_id, command.seq);
        let op = match KvOp::from_command(&command) {
            Ok(op) => op,
            Err(e) => return self.invalid(index, Some(request), e),
        };
        let longest_key = match &op {
            KvOp::Redis(ops) => ops.iter().flat_map(|op| op.keys()).map(<[u8]>::len).max(),
            _ => Some(command.key.len()),
        };
        if longest_key.unwrap_or(0) > super::engine::MAX_KEY_BYTES {
            let error = KvError::Command(format!(
                "a key of {} bytes (at most {})",
                longest_key.unwrap_or(0),
                super::engine::MAX_KEY_BYTES
            ));
            return self.invalid(index, Some(request), error);
        }
        self.advance_clock(command.stamp_ms);
        if let KvOp::OpenSession { secret } = op {
            return self.open_session(index, secret);
        }
        self.apply_op(command.client_id, command.secret, command.seq, op)
    }

    /// Opens the session of the `OPEN_SESSION` entry at `index`: its id is `index` (never 0,
    /// never reused, the same on every replica). Evicts the least recently active session
    /// when that makes more than `max_sessions`.
    fn open_session(&mut self, index: u64, secret: u64) -> ApplyOutcome {
        assert!(
            !self.sessions.contains_key(&index),
            "session ids are log indexes, each opened once"
        );
        let session = Session {
            secret,
            last_seq: 0,
            last_active_ms: self.clock_ms,
            // Never answered: seq 0 is never a write's (see `apply_op`).
            reply: CommandReply::Put,
        };
        self.activity.insert((session.last_active_ms, index));
        self.sessions.insert(index, session);
        self.dirty_sessions.insert(index);
        self.evict_beyond_max_sessions(index);
        ApplyOutcome::Applied {
            client_id: NO_CLIENT,
            seq: 0,
            reply: CommandReply::SessionOpened {
                client_id: index,
                secret,
            },
        }
    }

    fn invalid(&self, index: u64, request: Option<(u64, u64)>, error: KvError) -> ApplyOutcome {
        log::error!("log entry {index} skipped: {error}");
        ApplyOutcome::Invalid {
            request,
            reason: error.to_string(),
        }
    }

    /// Moves the cluster clock forward to `stamp_ms` (never back) and drops
    /// the sessions that have been idle for longer than the TTL.
    fn advance_clock(&mut self, stamp_ms: u64) {
        self.clock_ms = self.clock_ms.max(stamp_ms);
        let oldest_alive_ms = self.clock_ms.saturating_sub(self.options.session_ttl_ms);
        while let Some(&(last_active_ms, client_id)) = self.activity.first() {
            if last_active_ms >= oldest_alive_ms {
                break;
            }
            self.remove_session(client_id);
        }
    }

    fn apply_op(&mut self, client_id: u64, secret: u64, seq: u64, op: KvOp) -> ApplyOutcome {
        if op == KvOp::Noop {
            return ApplyOutcome::Noop;
        }
        // A command without a client (NO_CLIENT) has no session: it is
        // neither deduplicated nor remembered.
        let has_session = client_id != NO_CLIENT;
        if has_session {
            let Some(session) = self
                .sessions
                .get(&client_id)
                .filter(|session| session.secret == secret)
            else {
                return ApplyOutcome::SessionUnknown { client_id, seq };
            };
            let (last_seq, saved) = (session.last_seq, session.reply.clone());
            if seq <= last_seq || seq == 0 {
                // The client is alive: a retry counts as activity.
                self.set_session(client_id, last_seq, saved.clone());
                // A fresh session (last_seq 0) holds no reply: seq 0 is stale.
                return if seq == last_seq && seq != 0 {
                    ApplyOutcome::Duplicate {
                        client_id,
                        seq,
                        reply: saved,
                    }
                } else {
                    ApplyOutcome::Stale {
                        client_id,
                        seq,
                        last_seq,
                    }
                };
            }
        }
        if let Some(reason) = self.too_large(&op) {
            return ApplyOutcome::TooLarge {
                client_id,
                seq,
                reason,
            };
        }
        let reply = self.execute(op);
        if has_session {
            self.set_session(
                client_id,
                seq,
                reply.to_saved(self.options.max_saved_current_bytes),
            );
        }
        ApplyOutcome::Applied {
            client_id,
            seq,
            reply,
        }
    }

    /// Why `op` may not be applied: the value it would leave is over
    /// `max_value_bytes`. `None` when it fits.
    fn too_large(&mut self, op: &KvOp) -> Option<String> {
        let (key, bytes) = match op {
            KvOp::Put { key, value } => (key, value.len()),
            KvOp::Append { key, value } => {
                let old = self.read(key).map_or(0, |v| v.len());
                (key, old.saturating_add(value.len()))
            }
            KvOp::Cas { key, value, .. } => (key, value.len()),
            // Each op of a batch is checked as it applies (an error reply).
            KvOp::Delete { .. } | KvOp::Noop | KvOp::Redis(_) | KvOp::OpenSession { .. } => {
                return None
            }
        };
        let limit = self.options.max_value_bytes;
        (bytes > limit).then(|| {
            format!(
                "the value of key {:?} would be {bytes} bytes, over the limit of {limit} \
                 (max_value_bytes, half of max_append_bytes); nothing was changed",
                String::from_utf8_lossy(&key[..key.len().min(64)])
            )
        })
    }

    /// Carries out a write on the map and returns its reply.
    fn execute(&mut self, op: KvOp) -> CommandReply {
        match op {
            KvOp::Noop | KvOp::OpenSession { .. } => {
                unreachable!("no-ops and session openings are handled before execute")
            }
            KvOp::Put { key, value } => {
                self.set_value(key, value);
                CommandReply::Put
            }
            KvOp::Append { key, value } => {
                let mut combined = self.read(&key).unwrap_or_default();
                combined.extend_from_slice(&value);
                self.set_value(key, combined);
                CommandReply::Append
            }
            KvOp::Delete { key } => CommandReply::Delete {
                existed: self.remove_value(&key),
            },
            KvOp::Cas {
                key,
                expected,
                value,
            } => {
                let stored = self.read(&key);
                let found = stored.is_some();
                let current = stored.unwrap_or_default();
                let swapped = current == expected;
                if swapped {
                    self.set_value(key, value);
                }
                CommandReply::Cas {
                    swapped,
                    found,
                    current: Some(current),
                }
            }
            KvOp::Redis(ops) => {
                let limit = self.options.max_value_bytes;
                CommandReply::Redis(redis_ops::apply_writes(&mut MachineKeys(self), &ops, limit))
            }
        }
    }

    fn set_value(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.store.set(key, value);
    }

    /// Removes `key`; true when it existed.
    fn remove_value(&mut self, key: &[u8]) -> bool {
        let existed = self.read(key).is_some();
        if existed {
            self.store.remove(key.to_vec());
        }
        existed
    }

    /// Replaces the session of `client_id` (which exists), active now.
    fn set_session(&mut self, client_id: u64, last_seq: u64, reply: CommandReply) {
        let secret = self.sessions[&client_id].secret;
        self.remove_session(client_id);
        let session = Session {
            secret,
            last_seq,
            last_active_ms: self.clock_ms,
            reply,
        };
        self.activity.insert((session.last_active_ms, client_id));
        self.sessions.insert(client_id, session);
        self.dirty_sessions.insert(client_id);
    }

    fn remove_session(&mut self, client_id: u64) {
        if let Some(old) = self.sessions.remove(&client_id) {
            self.dirty_sessions.insert(client_id);
            let removed = self.activity.remove(&(old.last_active_ms, client_id));
            assert!(removed, "every session has an activity entry");
        }
    }

    /// Drops the least recently active sessions (ties: smaller client id
    /// first) until at most `max_sessions` remain, never the session of
    /// `keep`, which was just used.
    fn evict_beyond_max_sessions(&mut self, keep: u64) {
        while self.sessions.len() > self.options.max_sessions.max(1) {
            let victim = self
                .activity
                .iter()
                .map(|&(_, client_id)| client_id)
                .find(|&client_id| client_id != keep)
                .expect("more than one session exists, so one is not `keep`");
            self.remove_session(victim);
        }
    }

    // ------------------------------------------------------------ snapshots

    /// The whole state as bytes: a deterministic encoding (equal machines
    /// give equal bytes). Format, integers as LEB128 varints:
    ///
    /// ```text
    /// "KVSM" version:u8 applied_index clock_ms
    /// key_count { key_len key value_len value }*        keys strictly ascending
    /// session_count { client_id secret:u64le last_seq last_active_ms reply }*   ids ascending
    /// crc32:u32le                                        of all the bytes before it
    /// reply: 0 = Put | 1 = Append | 2 existed:u8 = Delete
    ///      | 3 flags:u8 [current_len current] = Cas  (flags: 1 swapped, 2 found, 4 current kept)
    ///      | 4 replies_len ExecReply-bytes = Redis | 5 client_id secret:u64le = SessionOpened
    /// ```
    ///
    /// Holds the whole data set in memory: for tests and small states only; a server streams
    /// its snapshots from a view of the engine.
    pub fn snapshot(&self) -> Vec<u8> {
        let sessions = self
            .sessions
            .iter()
            .map(|(&client_id, session)| {
                let mut encoded = Vec::new();
                put_session(&mut encoded, session);
                (client_id, encoded)
            })
            .collect();
        let meta = EngineMeta {
            applied_index: self.applied_index,
            clock_ms: self.clock_ms,
        };
        encode_snapshot(meta, sessions, |each| self.store.for_each_committed(each))
            .expect("the store reads back")
    }

    /// Rebuilds a state machine from `snapshot()` bytes. Every byte is
    /// checked (checksum, lengths, ordering, trailing data); malformed input
    /// gives an error naming what is wrong, never a panic or a huge allocation.
    pub fn restore(bytes: &[u8], options: KvOptions) -> Result<KvStateMachine, KvError> {
        KvStateMachine::restore_to(bytes, options, Store::memory())
    }

    /// [`restore`](Self::restore) into `engine`, which must be empty; the result is
    /// checkpointed (durable) when this returns.
    pub fn restore_into(
        bytes: &[u8],
        options: KvOptions,
        engine: Engine,
    ) -> Result<KvStateMachine, KvError> {
        let mut machine = KvStateMachine::restore_to(bytes, options, Store::engine(engine))?;
        machine.commit_batch(true)?;
        Ok(machine)
    }

    fn restore_to(
        bytes: &[u8],
        options: KvOptions,
        store: Store,
    ) -> Result<KvStateMachine, KvError> {
        let body_len = bytes
            .len()
            .checked_sub(4)
            .filter(|&n| n > SNAPSHOT_MAGIC.len())
            .ok_or_else(|| snapshot_error(format!("{} bytes is too short", bytes.len())))?;
        let (body, trailer) = bytes.split_at(body_len);
        if &body[..SNAPSHOT_MAGIC.len()] != SNAPSHOT_MAGIC {
            return Err(snapshot_error(
                "bad magic: not a key-value snapshot".to_string(),
            ));
        }
        let version = body[SNAPSHOT_MAGIC.len()];
        if version != SNAPSHOT_VERSION {
            return Err(snapshot_error(format!(
                "unsupported version {version} (this build reads {SNAPSHOT_VERSION})"
            )));
        }
        let stored_crc = u32::from_le_bytes(trailer.try_into().expect("the trailer is 4 bytes"));
        let actual_crc = crc32fast::hash(body);
        if stored_crc != actual_crc {
            return Err(snapshot_error(format!(
                "checksum mismatch (stored {stored_crc:#010x}, computed {actual_crc:#010x})"
            )));
        }
        let mut reader = Reader {
            bytes: body,
            pos: SNAPSHOT_MAGIC.len() + 1,
        };
        let mut machine = KvStateMachine::with_store(options, store);
        machine.applied_index = reader.varint("applied index")?;
        machine.clock_ms = reader.varint("clock")?;
        machine.restore_map(&mut reader)?;
        machine.restore_sessions(&mut reader)?;
        if reader.remaining() != 0 {
            return Err(snapshot_error(format!(
                "{} unexpected bytes after the sessions",
                reader.remaining()
            )));
        }
        Ok(machine)
    }

    fn restore_map(&mut self, reader: &mut Reader<'_>) -> Result<(), KvError> {
        // Each entry takes at least two bytes (two empty lengths).
        let count = reader.count("key count", 2)?;
        let mut last: Option<Vec<u8>> = None;
        for i in 0..count {
            let key = reader.bytes(|| format!("key {i}"))?.to_vec();
            let value = reader.bytes(|| format!("value of key {i}"))?.to_vec();
            if last.as_ref().is_some_and(|last| *last >= key) {
                return Err(snapshot_error(format!("key {i} is out of order")));
            }
            last = Some(key.clone());
            self.set_value(key, value);
            if self.store.batch_is_full() {
                self.commit_batch(false)?;
            }
        }
        Ok(())
    }

    fn restore_sessions(&mut self, reader: &mut Reader<'_>) -> Result<(), KvError> {
        // Each session takes at least twelve bytes (the secret, three varints and a tag).
        let count = reader.count("session count", 12)?;
        for i in 0..count {
            let client_id = reader.varint("session client id")?;
            let session = read_session(reader, i)?;
            let last_active_ms = session.last_active_ms;
            if self
                .sessions
                .last_key_value()
                .is_some_and(|(&last, _)| last >= client_id)
            {
                return Err(snapshot_error(format!(
                    "session {i} (client {client_id}) is out of order"
                )));
            }
            // A session's id is the index of the entry that opened it.
            if client_id == NO_CLIENT
                || client_id > self.applied_index
                || last_active_ms > self.clock_ms
            {
                return Err(snapshot_error(format!(
                    "session {i}: client {client_id} active at {last_active_ms} ms, clock {} ms",
                    self.clock_ms
                )));
            }
            self.activity.insert((last_active_ms, client_id));
            self.sessions.insert(client_id, session);
            self.dirty_sessions.insert(client_id);
        }
        self.commit_batch(false)
    }
}

/// The snapshot encoding (see [`KvStateMachine::snapshot`]) of `meta`, the keys `scan`
/// visits in order, and `sessions` (id, `put_session` bytes) in id order.
fn encode_snapshot<E>(
    meta: EngineMeta,
    sessions: Vec<(u64, Vec<u8>)>,
    scan: impl FnOnce(&mut dyn FnMut(&[u8], &[u8])) -> Result<(), E>,
) -> Result<Vec<u8>, E> {
    let mut out = Vec::new();
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.push(SNAPSHOT_VERSION);
    put_varint(&mut out, meta.applied_index);
    put_varint(&mut out, meta.clock_ms);
    let mut count = 0u64;
    let mut entries = Vec::new();
    scan(&mut |key, value| {
        count += 1;
        put_bytes(&mut entries, key);
        put_bytes(&mut entries, value);
    })?;
    put_varint(&mut out, count);
    out.extend_from_slice(&entries);
    drop(entries);
    put_varint(&mut out, sessions.len() as u64);
    for (client_id, session) in sessions {
        put_varint(&mut out, client_id);
        out.extend_from_slice(&session);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// A session without its client id: `secret:u64le last_seq last_active_ms reply`.
fn put_session(out: &mut Vec<u8>, session: &Session) {
    out.extend_from_slice(&session.secret.to_le_bytes());
    put_varint(out, session.last_seq);
    put_varint(out, session.last_active_ms);
    put_reply(out, &session.reply);
}

fn read_session(reader: &mut Reader<'_>, number: u64) -> Result<Session, KvError> {
    let secret = reader.u64_le("session secret")?;
    let last_seq = reader.varint("session seq")?;
    let last_active_ms = reader.varint("session activity time")?;
    let reply = read_reply(reader, number)?;
    Ok(Session {
        secret,
        last_seq,
        last_active_ms,
        reply,
    })
}

/// Whether `bytes` is a whole session row of the format before sessions had secrets
/// (`last_seq last_active_ms reply`), so that an older data directory is named as such
/// rather than as damaged (the engine's row checksum already passed).
fn is_session_without_secret(bytes: &[u8], number: u64) -> bool {
    let mut reader = Reader { bytes, pos: 0 };
    reader.varint("session seq").is_ok()
        && reader.varint("session activity time").is_ok()
        && read_reply(&mut reader, number).is_ok()
        && reader.remaining() == 0
}

/// The machine's map as the Redis writes see it.
struct MachineKeys<'a>(&'a mut KvStateMachine);

impl redis_ops::Keyspace for MachineKeys<'_> {
    fn read(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.read(key)
    }
    fn write(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.0.set_value(key, value);
    }
    fn delete(&mut self, key: &[u8]) -> bool {
        self.0.remove_value(key)
    }
}

// ------------------------------------------------------- snapshot encoding

const SNAPSHOT_MAGIC: &[u8; 4] = b"KVSM";
/// 2: sessions carry their secret (opened through the log).
const SNAPSHOT_VERSION: u8 = 2;

const REPLY_PUT: u8 = 0;
const REPLY_APPEND: u8 = 1;
const REPLY_DELETE: u8 = 2;
const REPLY_CAS: u8 = 3;
/// Followed by the replies as `ExecReply` bytes (length-prefixed).
const REPLY_REDIS: u8 = 4;
const REPLY_SESSION_OPENED: u8 = 5;
const CAS_SWAPPED: u8 = 1;
const CAS_FOUND: u8 = 2;
const CAS_CURRENT_KEPT: u8 = 4;

fn snapshot_error(why: String) -> KvError {
    KvError::Snapshot(why)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_reply(out: &mut Vec<u8>, reply: &CommandReply) {
    match reply {
        CommandReply::Put => out.push(REPLY_PUT),
        CommandReply::Append => out.push(REPLY_APPEND),
        CommandReply::Delete { existed } => {
            out.extend_from_slice(&[REPLY_DELETE, u8::from(*existed)])
        }
        CommandReply::Cas {
            swapped,
            found,
            current,
        } => {
            let mut flags = 0;
            flags |= if *swapped { CAS_SWAPPED } else { 0 };
            flags |= if *found { CAS_FOUND } else { 0 };
            flags |= if current.is_some() {
                CAS_CURRENT_KEPT
            } else {
                0
            };
            out.extend_from_slice(&[REPLY_CAS, flags]);
            if let Some(current) = current {
                put_bytes(out, current);
            }
        }
        CommandReply::Redis(replies) => {
            out.push(REPLY_REDIS);
            put_bytes(out, &redis_ops::encode_replies(replies));
        }
        CommandReply::SessionOpened { client_id, secret } => {
            out.push(REPLY_SESSION_OPENED);
            put_varint(out, *client_id);
            out.extend_from_slice(&secret.to_le_bytes());
        }
    }
}

fn read_reply(reader: &mut Reader<'_>, session: u64) -> Result<CommandReply, KvError> {
    let what = || format!("reply of session {session}");
    Ok(match reader.byte(&what())? {
        REPLY_PUT => CommandReply::Put,
        REPLY_APPEND => CommandReply::Append,
        REPLY_DELETE => match reader.byte(&what())? {
            flag @ (0 | 1) => CommandReply::Delete { existed: flag == 1 },
            other => return Err(snapshot_error(format!("{}: bad flag {other}", what()))),
        },
        REPLY_CAS => {
            let flags = reader.byte(&what())?;
            if flags & !(CAS_SWAPPED | CAS_FOUND | CAS_CURRENT_KEPT) != 0 {
                return Err(snapshot_error(format!("{}: bad flags {flags:#x}", what())));
            }
            let current = if flags & CAS_CURRENT_KEPT != 0 {
                Some(reader.bytes(what)?.to_vec())
            } else {
                None
            };
            CommandReply::Cas {
                swapped: flags & CAS_SWAPPED != 0,
                found: flags & CAS_FOUND != 0,
                current,
            }
        }
        REPLY_REDIS => {
            let bytes = reader.bytes(what)?;
            CommandReply::Redis(
                redis_ops::decode_replies(bytes)
                    .map_err(|e| snapshot_error(format!("{}: {e}", what())))?,
            )
        }
        REPLY_SESSION_OPENED => CommandReply::SessionOpened {
            client_id: reader.varint(&what())?,
            secret: reader.u64_le(&what())?,
        },
        tag => return Err(snapshot_error(format!("{}: unknown tag {tag}", what()))),
    })
}

/// A cursor over snapshot bytes whose every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn truncated(&self, what: &str) -> KvError {
        snapshot_error(format!(
            "truncated while reading the {what} at byte {}",
            self.pos
        ))
    }

    fn u64_le(&mut self, what: &str) -> Result<u64, KvError> {
        let end = self.pos + 8;
        let bytes = self
            .bytes
            .get(self.pos..end)
            .ok_or_else(|| self.truncated(what))?;
        self.pos = end;
        Ok(u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
    }

    fn byte(&mut self, what: &str) -> Result<u8, KvError> {
        let byte = *self
            .bytes
            .get(self.pos)
            .ok_or_else(|| self.truncated(what))?;
        self.pos += 1;
        Ok(byte)
    }

    fn varint(&mut self, what: &str) -> Result<u64, KvError> {
        let mut value = 0u64;
        // A u64 takes at most ten 7-bit groups, the last holding one bit.
        for shift in (0..64).step_by(7) {
            let byte = self.byte(what)?;
            let group = u64::from(byte & 0x7f);
            if shift == 63 && group > 1 {
                break;
            }
            value |= group << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(snapshot_error(format!(
            "the {what} at byte {} overflows 64 bits",
            self.pos
        )))
    }

    /// A count of items that each take at least `min_item_bytes`: bounded
    /// by what remains, so garbage cannot make the caller loop for long.
    fn count(&mut self, what: &str, min_item_bytes: usize) -> Result<u64, KvError> {
        let count = self.varint(what)?;
        let most = (self.remaining() / min_item_bytes) as u64;
        if count > most {
            return Err(snapshot_error(format!(
                "{what} {count} does not fit in the {} bytes left",
                self.remaining()
            )));
        }
        Ok(count)
    }

    fn bytes(&mut self, what: impl Fn() -> String) -> Result<&[u8], KvError> {
        let len = self.varint(&what())?;
        if len > self.remaining() as u64 {
            return Err(self.truncated(&what()));
        }
        let start = self.pos;
        self.pos += len as usize;
        Ok(&self.bytes[start..self.pos])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> KvOptions {
        KvOptions {
            session_ttl_ms: 1_000,
            max_sessions: 3,
            max_saved_current_bytes: 8,
            max_value_bytes: 10,
        }
    }

    /// Issue 16, item 2: one limit for every way a value is made. Before,
    /// Append grew a value without bound (until no Get of it fit in a frame).
    #[test]
    fn no_write_makes_a_value_over_max_value_bytes() {
        let mut d = Driver::new();
        assert_eq!(d.reply(1, 1, put("k", "123456")), CommandReply::Put);
        assert_eq!(d.reply(1, 2, append("k", "7890")), CommandReply::Append);
        assert_eq!(d.get("k").as_deref(), Some("1234567890"));
        for (seq, op) in [
            (3, append("k", "x")),
            (4, put("j", "12345678901")),
            (5, cas("k", "1234567890", "12345678901")),
        ] {
            match d.run(1, seq, 0, op) {
                ApplyOutcome::TooLarge { reason, .. } => {
                    assert!(
                        reason.contains("over the limit of 10 (max_value_bytes"),
                        "{reason}"
                    )
                }
                other => panic!("seq {seq}: expected TooLarge, got {other:?}"),
            }
        }
        assert_eq!(d.get("k").as_deref(), Some("1234567890"));
        assert_eq!(d.get("j"), None);
        // A refused write leaves the session as it was: the next seq works.
        assert_eq!(d.reply(1, 6, append("j", "1")), CommandReply::Append);
        assert_eq!(d.get("j").as_deref(), Some("1"));
    }

    /// A Redis batch is one entry: a retry of it is answered from the session (the saved
    /// replies, a large old value replaced by a "not retained" error) and applied once; the
    /// saved replies survive a snapshot.
    #[test]
    fn a_retried_redis_batch_is_applied_once_and_its_replies_survive_a_snapshot() {
        let mut d = Driver::new();
        let batch = KvOp::Redis(vec![
            RedisWrite::IncrBy {
                key: "n".into(),
                delta: 2,
            },
            RedisWrite::MSet(vec![
                ("a".into(), "123456789".into()),
                ("b".into(), "2".into()),
            ]),
            RedisWrite::Set {
                key: "a".into(),
                value: "x".into(),
                nx: false,
                xx: false,
                get: true,
            },
        ]);
        let first = d.reply(1, 1, batch.clone());
        assert_eq!(
            first,
            CommandReply::Redis(vec![
                RedisReply::Int(2),
                RedisReply::Ok,
                RedisReply::Bulk("123456789".into()),
            ])
        );
        let machine = KvStateMachine::restore(&d.machine.snapshot(), options()).unwrap();
        d.machine = machine;
        match d.run(1, 1, 0, batch) {
            ApplyOutcome::Duplicate { reply, .. } => match reply {
                CommandReply::Redis(replies) => {
                    assert_eq!(replies[..2], [RedisReply::Int(2), RedisReply::Ok]);
                    assert!(
                        matches!(&replies[2], RedisReply::Error(e) if e.contains("not retained"))
                    );
                }
                other => panic!("{other:?}"),
            },
            other => panic!("a retry was not answered from the session: {other:?}"),
        }
        assert_eq!(d.get("n").as_deref(), Some("2"));
        assert_eq!(d.get("a").as_deref(), Some("x"));
    }

    fn put(key: &str, value: &str) -> KvOp {
        KvOp::Put {
            key: key.into(),
            value: value.into(),
        }
    }
    fn append(key: &str, value: &str) -> KvOp {
        KvOp::Append {
            key: key.into(),
            value: value.into(),
        }
    }
    fn delete(key: &str) -> KvOp {
        KvOp::Delete { key: key.into() }
    }
    fn cas(key: &str, expected: &str, value: &str) -> KvOp {
        KvOp::Cas {
            key: key.into(),
            expected: expected.into(),
            value: value.into(),
        }
    }

    /// A test driver: applies commands at consecutive indexes. Tests name
    /// clients by small numbers; the first command of a client opens its
    /// session (an `OPEN_SESSION` entry) at that command's stamp.
    struct Driver {
        machine: KvStateMachine,
        /// Client number to (session id, secret).
        sessions: std::collections::HashMap<u64, (u64, u64)>,
    }

    impl Driver {
        fn new() -> Driver {
            Driver {
                machine: KvStateMachine::new(options()),
                sessions: Default::default(),
            }
        }
        /// Opens a session for `client` (forgetting the one it had).
        fn open(&mut self, client: u64, stamp_ms: u64) -> u64 {
            let secret = client.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5eed;
            let command = make_command(NO_CLIENT, 0, stamp_ms, KvOp::OpenSession { secret });
            match self.raw(&encode_command(&command)) {
                ApplyOutcome::Applied {
                    reply: CommandReply::SessionOpened { client_id, secret },
                    ..
                } => {
                    assert_eq!(client_id, self.machine.applied_index());
                    self.sessions.insert(client, (client_id, secret));
                    client_id
                }
                other => panic!("expected a session, got {other:?}"),
            }
        }
        /// The session id of `client`.
        fn id(&self, client: u64) -> u64 {
            self.sessions[&client].0
        }
        fn run(&mut self, client: u64, seq: u64, stamp_ms: u64, op: KvOp) -> ApplyOutcome {
            if client != NO_CLIENT && !self.sessions.contains_key(&client) {
                self.open(client, stamp_ms);
            }
            let (client_id, secret) = self.sessions.get(&client).copied().unwrap_or_default();
            let command = make_session_command(client_id, secret, seq, stamp_ms, op);
            self.raw(&encode_command(&command))
        }
        fn raw(&mut self, data: &[u8]) -> ApplyOutcome {
            let index = self.machine.applied_index() + 1;
            self.machine.apply(index, data)
        }
        fn reply(&mut self, client_id: u64, seq: u64, op: KvOp) -> CommandReply {
            match self.run(client_id, seq, 0, op) {
                ApplyOutcome::Applied { reply, .. } => reply,
                other => panic!("expected Applied, got {other:?}"),
            }
        }
        fn get(&self, key: &str) -> Option<String> {
            self.machine
                .get(key.as_bytes())
                .unwrap()
                .map(|v| String::from_utf8(v).unwrap())
        }
    }

    fn cas_reply(swapped: bool, found: bool, current: &str) -> CommandReply {
        CommandReply::Cas {
            swapped,
            found,
            current: Some(current.into()),
        }
    }

    #[test]
    fn every_op() {
        let mut d = Driver::new();
        assert_eq!(d.reply(1, 1, put("a", "1")), CommandReply::Put);
        assert_eq!(d.get("a").as_deref(), Some("1"));
        assert_eq!(d.reply(1, 2, append("a", "2")), CommandReply::Append);
        assert_eq!(d.get("a").as_deref(), Some("12"));
        assert_eq!(
            d.reply(1, 3, cas("a", "x", "3")),
            cas_reply(false, true, "12")
        );
        assert_eq!(d.get("a").as_deref(), Some("12"));
        assert_eq!(
            d.reply(1, 4, cas("a", "12", "3")),
            cas_reply(true, true, "12")
        );
        assert_eq!(d.get("a").as_deref(), Some("3"));
        assert_eq!(
            d.reply(1, 5, delete("a")),
            CommandReply::Delete { existed: true }
        );
        assert_eq!(d.get("a").as_deref(), None);
        assert_eq!(
            d.reply(1, 6, delete("a")),
            CommandReply::Delete { existed: false }
        );
        assert!(d.machine.is_empty());
        // Six commands and the entry that opened the session.
        assert_eq!(d.machine.applied_index(), 7);
    }

    #[test]
    fn missing_key_counts_as_empty_for_append_and_cas() {
        let mut d = Driver::new();
        d.reply(1, 1, append("a", "x"));
        assert_eq!(d.get("a").as_deref(), Some("x"));
        assert_eq!(
            d.reply(1, 2, cas("b", "y", "1")),
            cas_reply(false, false, "")
        );
        assert_eq!(d.get("b").as_deref(), None);
        assert_eq!(d.reply(1, 3, cas("b", "", "1")), cas_reply(true, false, ""));
        assert_eq!(d.get("b").as_deref(), Some("1"));
        assert_eq!(d.machine.len(), 2);
    }

    #[test]
    fn raft_noop_and_noop_command_change_nothing_but_the_index() {
        let mut d = Driver::new();
        assert_eq!(d.raw(&[]), ApplyOutcome::Noop);
        assert_eq!(d.run(NO_CLIENT, 1, 0, KvOp::Noop), ApplyOutcome::Noop);
        assert_eq!(d.machine.applied_index(), 2);
        assert_eq!(d.machine.session_count(), 0);
        // An all-default command still encodes to non-empty bytes.
        assert!(!encode_command(&Command::default()).is_empty());
    }

    #[test]
    fn retried_seq_returns_the_saved_reply_without_reapplying() {
        let mut d = Driver::new();
        d.reply(7, 1, append("k", "a"));
        assert_eq!(
            d.run(7, 1, 0, append("k", "a")),
            ApplyOutcome::Duplicate {
                client_id: d.id(7),
                seq: 1,
                reply: CommandReply::Append
            }
        );
        assert_eq!(d.get("k").as_deref(), Some("a"));
        let first = d.reply(7, 2, cas("k", "a", "b"));
        assert_eq!(
            d.run(7, 2, 0, cas("k", "a", "b")),
            ApplyOutcome::Duplicate {
                client_id: d.id(7),
                seq: 2,
                reply: first
            }
        );
        assert_eq!(d.get("k").as_deref(), Some("b"));
        // Another client's seq 1 is its own.
        d.reply(8, 1, append("k", "c"));
        assert_eq!(d.get("k").as_deref(), Some("bc"));
    }

    #[test]
    fn older_seq_is_stale() {
        let mut d = Driver::new();
        d.reply(7, 5, put("k", "a"));
        assert_eq!(
            d.run(7, 4, 0, put("k", "old")),
            ApplyOutcome::Stale {
                client_id: d.id(7),
                seq: 4,
                last_seq: 5
            }
        );
        assert_eq!(d.get("k").as_deref(), Some("a"));
    }

    #[test]
    fn large_cas_current_is_not_kept_in_the_session() {
        let mut d = Driver::new();
        d.reply(1, 1, put("k", "0123456789"));
        let reply = d.reply(1, 2, cas("k", "x", "y"));
        assert_eq!(reply, cas_reply(false, true, "0123456789"));
        let replay = d.run(1, 2, 0, cas("k", "x", "y"));
        let saved = CommandReply::Cas {
            swapped: false,
            found: true,
            current: None,
        };
        assert_eq!(
            replay,
            ApplyOutcome::Duplicate {
                client_id: d.id(1),
                seq: 2,
                reply: saved
            }
        );
    }

    #[test]
    fn client_zero_has_no_session() {
        let mut d = Driver::new();
        d.reply(NO_CLIENT, 1, append("k", "a"));
        d.reply(NO_CLIENT, 1, append("k", "a"));
        assert_eq!(d.get("k").as_deref(), Some("aa"));
        assert_eq!(d.machine.session_count(), 0);
    }

    #[test]
    fn undecodable_entry_is_skipped() {
        let mut d = Driver::new();
        let outcome = d.raw(&[0xff, 0xff, 0xff]);
        assert!(
            matches!(outcome, ApplyOutcome::Invalid { request: None, .. }),
            "{outcome:?}"
        );
        // Op 9 is unknown, but client and seq decode.
        let mut command = make_command(3, 4, 0, put("k", "v"));
        command.op = EnumOrUnknown::from_i32(9);
        let outcome = d.raw(&encode_command(&command));
        assert!(
            matches!(
                outcome,
                ApplyOutcome::Invalid {
                    request: Some((3, 4)),
                    ..
                }
            ),
            "{outcome:?}"
        );
        assert_eq!(d.machine.applied_index(), 2);
        assert!(d.machine.is_empty());
        assert_eq!(d.machine.session_count(), 0);
    }

    #[test]
    fn replayed_index_is_already_applied() {
        let mut d = Driver::new();
        d.reply(1, 1, append("k", "a"));
        let data = encode_command(&make_command(NO_CLIENT, 1, 0, append("k", "b")));
        assert_eq!(d.machine.apply(1, &data), ApplyOutcome::AlreadyApplied);
        assert_eq!(d.machine.apply(2, &data), ApplyOutcome::AlreadyApplied);
        assert_eq!(d.get("k").as_deref(), Some("a"));
    }

    #[test]
    fn idle_sessions_expire_by_cluster_time() {
        let mut d = Driver::new();
        d.run(1, 1, 1_000, append("k", "a"));
        d.run(2, 1, 1_500, append("k", "b"));
        // 2_000 - 1_000 = TTL exactly: client 1 is still alive.
        d.run(2, 2, 2_000, append("k", "c"));
        assert!(matches!(
            d.run(1, 1, 2_000, append("k", "a")),
            ApplyOutcome::Duplicate { .. }
        ));
        // A stamp from a leader whose clock went back does not move time back.
        d.run(2, 3, 10, append("k", "d"));
        assert_eq!(d.machine.clock_ms(), 2_000);
        d.run(2, 4, 2_500, append("k", "e"));
        // Client 1 was last active at 2_000; at 3_001 it is gone (client 2,
        // active at 2_500, is not), and its retry is refused as of an
        // unknown session: never applied twice.
        assert!(matches!(
            d.run(2, 5, 3_001, append("k", "")),
            ApplyOutcome::Applied { .. }
        ));
        assert_eq!(d.machine.session_count(), 1);
        assert_eq!(
            d.run(1, 1, 3_001, append("k", "a")),
            ApplyOutcome::SessionUnknown {
                client_id: d.id(1),
                seq: 1
            }
        );
        assert_eq!(d.get("k").as_deref(), Some("abcde"));
    }

    #[test]
    fn max_sessions_evicts_least_recently_active_then_smaller_id() {
        let mut d = Driver::new();
        d.run(10, 1, 100, put("k", "v"));
        d.run(30, 1, 200, put("k", "v"));
        d.run(20, 1, 200, put("k", "v"));
        assert!(d.id(30) < d.id(20));
        d.run(40, 1, 300, put("k", "v")); // its opening evicts 10 (least recent)
        let gone = |outcome: ApplyOutcome| matches!(outcome, ApplyOutcome::SessionUnknown { .. });
        assert!(gone(d.run(10, 1, 300, put("k", "v"))));
        // 10 opens a new session: evicts 30 (tie with 20 at 200, smaller id).
        d.open(10, 300);
        assert!(gone(d.run(30, 1, 300, put("k", "v"))));
        assert!(matches!(
            d.run(20, 1, 300, put("k", "v")),
            ApplyOutcome::Duplicate { .. }
        ));
        assert!(matches!(
            d.run(10, 1, 300, put("k", "v")),
            ApplyOutcome::Applied { .. }
        ));
        assert_eq!(d.machine.session_count(), 3);
        // A new session is never its own victim, even when all tie.
        assert!(matches!(
            d.run(1, 1, 300, put("k", "v")),
            ApplyOutcome::Applied { .. }
        ));
        assert!(matches!(
            d.run(1, 1, 300, put("k", "v")),
            ApplyOutcome::Duplicate { .. }
        ));
    }

    /// Issue 16, item 8. Before, a client could invent client ids: each
    /// write with a new id made a session, `max_sessions` of them evicted
    /// the victim's, and the victim's retry of a write already applied was
    /// applied a second time. Now an invented id makes no session and
    /// changes nothing.
    #[test]
    fn invented_client_ids_make_no_session_and_evict_nobody() {
        let mut d = Driver::new();
        d.reply(1, 1, append("k", "once"));
        let victim = d.id(1);
        for invented in 1_000..1_100 {
            let command = make_command(invented, 1, 0, put("x", "spam"));
            assert_eq!(
                d.raw(&encode_command(&command)),
                ApplyOutcome::SessionUnknown {
                    client_id: invented,
                    seq: 1
                }
            );
        }
        assert_eq!(d.machine.session_count(), 1);
        assert!(d.machine.has_session(victim));
        assert_eq!(d.get("x"), None);
        // The victim's retry is answered from its session, not applied again.
        assert!(matches!(
            d.run(1, 1, 0, append("k", "once")),
            ApplyOutcome::Duplicate { .. }
        ));
        assert_eq!(d.get("k").as_deref(), Some("once"));
    }

    /// Issue 16, item 8. Sessions opened by the log can still evict a victim
    /// (past `max_sessions`), but its retry is then refused as of an unknown
    /// session (the clerk reports the outcome unknown): never applied twice.
    #[test]
    fn an_evicted_victims_retry_is_refused_not_applied_again() {
        let mut d = Driver::new();
        d.reply(1, 1, append("k", "once"));
        for attacker in 100..103 {
            d.open(attacker, 0);
        }
        assert!(!d.machine.has_session(d.id(1)));
        assert!(matches!(
            d.run(1, 1, 0, append("k", "once")),
            ApplyOutcome::SessionUnknown { .. }
        ));
        assert_eq!(d.get("k").as_deref(), Some("once"));
    }

    /// Issue 16, item 8. Before, anyone could send a victim's (client_id,
    /// next seq): the victim's own write with that seq was then answered as
    /// a duplicate and never applied. Without the session's secret such a
    /// write is refused and the victim's seq stays free.
    #[test]
    fn another_clients_id_without_its_secret_cannot_fake_a_duplicate() {
        let mut d = Driver::new();
        d.reply(1, 1, put("k", "victim-1"));
        let (victim, secret) = d.sessions[&1];
        for wrong in [0, secret ^ 1, secret.wrapping_add(1 << 40)] {
            let forged = make_session_command(victim, wrong, 2, 0, put("k", "forged"));
            assert_eq!(
                d.raw(&encode_command(&forged)),
                ApplyOutcome::SessionUnknown {
                    client_id: victim,
                    seq: 2
                }
            );
        }
        assert_eq!(d.get("k").as_deref(), Some("victim-1"));
        assert!(matches!(
            d.run(1, 2, 0, put("k", "victim-2")),
            ApplyOutcome::Applied { .. }
        ));
        assert_eq!(d.get("k").as_deref(), Some("victim-2"));
        // A fresh session's seq 0 holds no reply to replay.
        d.open(2, 0);
        assert!(matches!(
            d.run(2, 0, 0, put("k", "zero")),
            ApplyOutcome::Stale { .. }
        ));
    }

    /// A deterministic stream of commands from a few clients, with retries,
    /// stale seqs, clock jumps and a garbage entry.
    fn scripted_entries(count: u64) -> Vec<Vec<u8>> {
        let mut rng = crate::raft::SplitMix64::new(42);
        let mut seqs = [0u64; 6];
        let mut sessions = [0u64; 6];
        let mut stamp_ms = 0;
        (0..count)
            .map(|i| {
                if i % 97 == 13 {
                    return vec![0x0a, 0xff];
                }
                if i % 50 == 0 {
                    return Vec::new();
                }
                let client = (rng.next_u64() % 6) as usize;
                if sessions[client] == 0 || rng.next_u64().is_multiple_of(40) {
                    // The client's session: this entry's index (`apply_all`).
                    sessions[client] = i + 1;
                    seqs[client] = 0;
                    let open = KvOp::OpenSession { secret: i * 7 };
                    return encode_command(&make_command(NO_CLIENT, 0, stamp_ms, open));
                }
                let r = rng.next_u64() % 10;
                if r != 0 || seqs[client] == 0 {
                    seqs[client] += 1;
                }
                stamp_ms += rng.next_u64() % 400;
                let key = format!("k{}", rng.next_u64() % 4);
                let op = match rng.next_u64() % 4 {
                    0 => put(&key, &format!("p{i}")),
                    1 => append(&key, &format!("a{i}")),
                    2 => delete(&key),
                    _ => cas(&key, "", &format!("c{i}")),
                };
                let (id, seq) = (sessions[client], seqs[client]);
                let secret = (id - 1) * 7;
                encode_command(&make_session_command(id, secret, seq, stamp_ms, op))
            })
            .collect()
    }

    fn apply_all(entries: &[Vec<u8>]) -> KvStateMachine {
        let mut machine = KvStateMachine::new(options());
        for (i, data) in entries.iter().enumerate() {
            machine.apply(i as u64 + 1, data);
        }
        machine
    }

    #[test]
    fn replicas_fed_the_same_entries_end_equal() {
        let entries = scripted_entries(2_000);
        let (a, b) = (apply_all(&entries), apply_all(&entries));
        assert_eq!(a, b);
        assert_eq!(a.snapshot(), b.snapshot());
        assert!(a.session_count() <= 3);
    }

    #[test]
    fn snapshot_round_trip_equals_the_original() {
        let entries = scripted_entries(500);
        let original = apply_all(&entries);
        let restored = KvStateMachine::restore(&original.snapshot(), options()).unwrap();
        assert_eq!(restored, original);
        // Continuing from the snapshot gives the same state as never stopping.
        let more = scripted_entries(800);
        let (mut a, mut b) = (original, restored);
        for (i, data) in more.iter().enumerate().skip(500) {
            assert_eq!(a.apply(i as u64 + 1, data), b.apply(i as u64 + 1, data));
        }
        assert_eq!(a, b);
    }

    #[test]
    fn snapshot_of_many_appends_on_one_key_is_small() {
        let mut d = Driver::new();
        let stamp_ms = 1_700_000_000_000;
        for i in 0..800u64 {
            let client = 0x9e37_79b9_7f4a_7c15 + i % 2;
            let op = if i % 2 == 0 {
                put("x", "0")
            } else {
                append("x", "1")
            };
            d.run(client, i / 2 + 1, stamp_ms + i, op);
        }
        let bytes = d.machine.snapshot();
        assert!(bytes.len() < 100, "snapshot is {} bytes", bytes.len());
    }

    #[test]
    fn restore_rejects_garbage_and_truncation() {
        let machine = apply_all(&scripted_entries(300));
        let bytes = machine.snapshot();
        for len in 0..bytes.len() {
            assert!(
                KvStateMachine::restore(&bytes[..len], options()).is_err(),
                "prefix of {len} bytes"
            );
        }
        let mut flipped = bytes.clone();
        flipped[10] ^= 0x40;
        let error = KvStateMachine::restore(&flipped, options()).unwrap_err();
        assert!(error.to_string().contains("checksum"), "{error}");
        let mut rng = crate::raft::SplitMix64::new(7);
        for len in [0, 3, 9, 64, 1_000] {
            let garbage: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            assert!(KvStateMachine::restore(&garbage, options()).is_err());
        }
    }

    /// Re-seals `body` with a valid checksum, so the structural checks run.
    fn sealed(body: &[u8]) -> Vec<u8> {
        let mut out = body.to_vec();
        out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        out
    }

    #[test]
    fn restore_checks_structure_behind_a_valid_checksum() {
        let cases: [(&[u8], &str); 5] = [
            (b"KVSM\x03\x00\x00\x00\x00", "unsupported version 3"),
            (b"KVSM\x02\x00\x00\x05\x00", "key count 5 does not fit"),
            (
                b"KVSM\x02\x00\x00\x02\x01b\x00\x01a\x00\x00",
                "key 1 is out of order",
            ),
            (
                b"KVSM\x02\x00\x00\x00\x01\x01SECRET!!\x01\x05\x00",
                "active at 5 ms, clock 0 ms",
            ),
            (b"KVSM\x02\x00\x00\x00\x00\x07", "1 unexpected bytes"),
        ];
        for (body, expected) in cases {
            let error = KvStateMachine::restore(&sealed(body), options()).unwrap_err();
            assert!(
                error.to_string().contains(expected),
                "{error} should contain {expected:?}"
            );
        }
        let overflow = sealed(b"KVSM\x02\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f\x00\x00\x00");
        let error = KvStateMachine::restore(&overflow, options()).unwrap_err();
        assert!(error.to_string().contains("overflows"), "{error}");
    }

    /// A data directory from before sessions had secrets is refused with a line that says
    /// so (not as a damaged file): its log may hold writes this build would refuse.
    #[test]
    fn an_engine_with_sessions_of_the_older_format_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), 8 << 20).unwrap();
        let mut old_row = Vec::new();
        put_varint(&mut old_row, 7); // last_seq
        put_varint(&mut old_row, 1_000); // last_active_ms
        old_row.push(REPLY_PUT);
        let mut batch = EngineBatch::default();
        batch.sessions.insert(42, Some(old_row));
        engine.commit(&batch, true).unwrap();
        let text = match KvStateMachine::open(engine, KvOptions::default()) {
            Ok(_) => panic!("an older session row must be refused"),
            Err(error) => error.to_string(),
        };
        assert!(text.contains("written by an older kvstore-raft"), "{text}");
    }
}
