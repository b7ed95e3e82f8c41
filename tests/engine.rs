//! The storage engine under the state machine (issue 11), crash point by crash point: a crash
//! between the engine's batch and the WAL, before and after a durable checkpoint, at every
//! step of building and swapping in a snapshot from the leader; and damaged bytes in the
//! engine's files or in a received snapshot. After each crash the state is opened the way a
//! restarting node opens it (`open_machine`), the WAL's entries are replayed, and the state
//! must equal a replica's that applied the same entries without crashing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvstore_raft::kv::engine::{self, Engine, ENGINE_DIR_NAME};
use kvstore_raft::kv::server::open_machine;
use kvstore_raft::kv::state_machine::{
    encode_command, make_command, make_session_command, KvOp, KvOptions, KvStateMachine,
};
use kvstore_raft::raft::{Snapshot, SnapshotMeta, SplitMix64};

const CACHE_BYTES: u64 = 8 << 20;

fn options() -> KvOptions {
    KvOptions::default()
}

/// A deterministic stream of log entries: the first five open the clients' sessions (their
/// ids are those entries' indexes, 1 to 5), then puts, appends, deletes and cas over 300
/// keys from those clients, with retries of the same (client, seq).
fn entries(count: usize) -> Vec<Vec<u8>> {
    let mut rng = SplitMix64::new(11);
    let mut seqs = [0u64; 5];
    (0..count)
        .map(|i| {
            if i < 5 {
                let open = KvOp::OpenSession {
                    secret: secret_of(i),
                };
                return encode_command(&make_command(0, 0, 1_000 + i as u64, open));
            }
            let client = (rng.next_u64() % 5) as usize;
            if !rng.next_u64().is_multiple_of(8) || seqs[client] == 0 {
                seqs[client] += 1;
            }
            let key = format!("key-{}", rng.next_u64() % 300).into_bytes();
            let value =
                format!("v{i}-{}", "x".repeat((rng.next_u64() % 200) as usize)).into_bytes();
            let op = match rng.next_u64() % 5 {
                0 | 1 => KvOp::Put { key, value },
                2 => KvOp::Append { key, value },
                3 => KvOp::Delete { key },
                _ => KvOp::Cas {
                    key,
                    expected: Vec::new(),
                    value,
                },
            };
            encode_command(&make_session_command(
                client as u64 + 1,
                secret_of(client),
                seqs[client],
                1_000 + i as u64,
                op,
            ))
        })
        .collect()
}

/// The secret of client `client`'s session (opened by entry `client`).
fn secret_of(client: usize) -> u64 {
    0x5eed_0000 + client as u64
}

/// A replica that applied `entries[..upto]` in memory, never crashing.
fn replica(entries: &[Vec<u8>], upto: usize) -> KvStateMachine {
    let mut machine = KvStateMachine::new(options());
    for (i, data) in entries[..upto].iter().enumerate() {
        machine.apply(i as u64 + 1, data);
    }
    machine
}

/// Applies `entries[from..to]` (indexes from + 1 ..= to) in apply tasks of `task` entries,
/// one engine batch per task, as the apply thread does.
fn apply_range(
    machine: &mut KvStateMachine,
    entries: &[Vec<u8>],
    from: usize,
    to: usize,
    task: usize,
) {
    for start in (from..to).step_by(task) {
        let end = (start + task).min(to);
        for (i, data) in entries.iter().enumerate().take(end).skip(start) {
            machine.apply_checked(i as u64 + 1, data).unwrap();
        }
        machine.commit_batch(false).unwrap();
    }
}

/// Opens the node's state as a restart does, then replays the WAL, which holds every entry
/// up to `wal_last` (entries at or below the engine's applied index are skipped).
fn restart(
    dir: &Path,
    snapshot: Option<&Snapshot>,
    entries: &[Vec<u8>],
    wal_last: usize,
) -> KvStateMachine {
    let mut machine = open_machine(dir, snapshot, options(), CACHE_BYTES).unwrap();
    let applied = machine.applied_index() as usize;
    let first = snapshot.map_or(0, |s| s.meta.index as usize);
    for (i, data) in entries.iter().enumerate().take(wal_last).skip(first) {
        machine.apply_checked(i as u64 + 1, data).unwrap();
    }
    machine.commit_batch(false).unwrap();
    assert!(applied <= wal_last, "the engine is ahead of the WAL");
    machine
}

fn open(dir: &Path) -> KvStateMachine {
    open_machine(dir, None, options(), CACHE_BYTES).unwrap()
}

fn live(dir: &Path) -> PathBuf {
    dir.join(ENGINE_DIR_NAME)
}

#[test]
fn a_crash_between_the_wal_and_the_engine_batch_is_replayed_from_the_wal() {
    let entries = entries(600);
    let dir = tempfile::tempdir().unwrap();
    let mut machine = open(dir.path());
    apply_range(&mut machine, &entries, 0, 200, 50);
    // Entries 201..=260 are in the WAL and applied in memory, but their batch is never
    // written: the process dies first.
    for (i, data) in entries.iter().enumerate().take(260).skip(200) {
        machine.apply_checked(i as u64 + 1, data).unwrap();
    }
    drop(machine);
    let reopened = open(dir.path());
    assert_eq!(
        reopened.applied_index(),
        200,
        "the applied index matches the last batch"
    );
    assert!(
        reopened == replica(&entries, 200),
        "the engine holds exactly the state at 200"
    );
    drop(reopened);
    let restarted = restart(dir.path(), None, &entries, 400);
    assert_eq!(restarted.applied_index(), 400);
    assert!(restarted == replica(&entries, 400));
}

#[test]
fn a_checkpoint_then_a_crash_then_compaction_keeps_the_state_whole() {
    let entries = entries(900);
    let dir = tempfile::tempdir().unwrap();
    let mut machine = open(dir.path());
    apply_range(&mut machine, &entries, 0, 300, 64);
    // The durable checkpoint the apply thread takes before the log is compacted at 300.
    machine.commit_batch(true).unwrap();
    apply_range(&mut machine, &entries, 300, 450, 64);
    drop(machine);
    // The WAL was compacted to 300 (a snapshot file with the index and no data) and holds
    // entries after it up to 700.
    let compacted = Snapshot {
        membership: Default::default(),
        meta: SnapshotMeta {
            index: 300,
            term: 1,
        },
        data: Arc::new(Vec::new()),
    };
    let restarted = restart(dir.path(), Some(&compacted), &entries, 700);
    assert!(restarted == replica(&entries, 700));
}

#[test]
fn an_engine_behind_a_compacted_log_without_data_refuses_to_start() {
    let entries = entries(200);
    let dir = tempfile::tempdir().unwrap();
    let mut machine = open(dir.path());
    apply_range(&mut machine, &entries, 0, 100, 50);
    drop(machine);
    // A log compacted at 150 although the engine holds 100: durable writes were lost.
    let compacted = Snapshot {
        membership: Default::default(),
        meta: SnapshotMeta {
            index: 150,
            term: 1,
        },
        data: Arc::new(Vec::new()),
    };
    let error = open_machine(dir.path(), Some(&compacted), options(), CACHE_BYTES).unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("applied index 100 is behind the log's snapshot at index 150"),
        "{message}"
    );
}

/// The steps of installing a leader's snapshot, each a place to crash.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// The snapshot file is saved; the incoming engine is half built.
    IncomingHalfBuilt,
    /// The incoming engine is complete and checkpointed, not yet swapped.
    IncomingComplete,
    /// The live engine was renamed to `.old`; the incoming one not yet renamed.
    LiveMovedAside,
    /// The incoming engine is live; `.old` not yet removed.
    SwappedOldLeft,
    /// Done.
    Swapped,
}

#[test]
fn a_crash_at_every_step_of_installing_a_snapshot_leaves_the_old_or_the_new_state() {
    let entries = entries(1_200);
    let leader = replica(&entries, 1_000);
    let bytes = leader.snapshot();
    let snapshot = Snapshot {
        membership: Default::default(),
        meta: SnapshotMeta {
            index: 1_000,
            term: 2,
        },
        data: Arc::new(bytes.clone()),
    };
    for step in [
        Step::IncomingHalfBuilt,
        Step::IncomingComplete,
        Step::LiveMovedAside,
        Step::SwappedOldLeft,
        Step::Swapped,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut machine = open(dir.path());
        apply_range(&mut machine, &entries, 0, 400, 100);
        machine.commit_batch(true).unwrap();
        drop(machine);
        let live = live(dir.path());
        let incoming = engine::incoming_dir(&live);
        let old = live.with_extension("old");
        match step {
            Step::IncomingHalfBuilt => {
                let half = Engine::open(&incoming, CACHE_BYTES).unwrap();
                let mut partial = KvStateMachine::open(half, options()).unwrap();
                apply_range(&mut partial, &entries, 0, 50, 50);
            }
            _ => {
                let fresh = Engine::open(&incoming, CACHE_BYTES).unwrap();
                drop(KvStateMachine::restore_into(&bytes, options(), fresh).unwrap());
            }
        }
        if matches!(
            step,
            Step::LiveMovedAside | Step::SwappedOldLeft | Step::Swapped
        ) {
            std::fs::rename(&live, &old).unwrap();
        }
        if matches!(step, Step::SwappedOldLeft | Step::Swapped) {
            std::fs::rename(&incoming, &live).unwrap();
        }
        if matches!(step, Step::Swapped) {
            std::fs::remove_dir_all(&old).unwrap();
        }
        // Restart with the snapshot file the event loop saved before the install began:
        // the node ends at the leader's state, then replays the log after it.
        let restarted = restart(dir.path(), Some(&snapshot), &entries, 1_200);
        assert!(
            restarted == replica(&entries, 1_200),
            "crash at {step:?}: the state is not the replica's"
        );
        assert!(
            !incoming.exists() && !old.exists(),
            "crash at {step:?}: leftovers"
        );
    }
}

#[test]
fn a_crash_before_the_snapshot_file_is_saved_keeps_the_old_state() {
    let entries = entries(500);
    let dir = tempfile::tempdir().unwrap();
    let mut machine = open(dir.path());
    apply_range(&mut machine, &entries, 0, 300, 100);
    machine.commit_batch(true).unwrap();
    drop(machine);
    // A half-received install left an incoming engine; no snapshot file names it.
    let incoming = engine::incoming_dir(&live(dir.path()));
    let half = Engine::open(&incoming, CACHE_BYTES).unwrap();
    let mut partial = KvStateMachine::open(half, options()).unwrap();
    apply_range(&mut partial, &entries, 0, 20, 20);
    drop(partial);
    let restarted = restart(dir.path(), None, &entries, 300);
    assert!(restarted == replica(&entries, 300));
    assert!(!incoming.exists(), "the half-built engine is discarded");
}

/// The largest file under `dir` whose path contains `part`.
fn largest_file(dir: &Path, part: &str) -> Option<PathBuf> {
    let mut best: Option<(u64, PathBuf)> = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.to_string_lossy().contains(part) {
                let len = std::fs::metadata(&path).unwrap().len();
                if best.as_ref().is_none_or(|(l, _)| len > *l) {
                    best = Some((len, path));
                }
            }
        }
    }
    best.map(|(_, path)| path)
}

#[test]
fn a_flipped_byte_in_the_engine_files_is_an_error_naming_them_never_a_wrong_value() {
    let dir = tempfile::tempdir().unwrap();
    let mut machine = open(dir.path());
    let mut rng = SplitMix64::new(5);
    let keys = 2_000u64;
    for i in 0..keys {
        let value: Vec<u8> = (0..256).map(|_| rng.next_u64() as u8).collect();
        let op = KvOp::Put {
            key: format!("key{i:06}").into_bytes(),
            value,
        };
        let data = encode_command(&make_command(0, 0, 0, op));
        machine.apply_checked(i + 1, &data).unwrap();
    }
    machine.commit_batch(true).unwrap();
    machine.engine().unwrap().flush().unwrap();
    let expected: Vec<Option<Vec<u8>>> = (0..keys)
        .map(|i| machine.get(format!("key{i:06}").as_bytes()).unwrap())
        .collect();
    drop(machine);
    let table = largest_file(&live(dir.path()), "tables").expect("a table file");
    let mut bytes = std::fs::read(&table).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&table, &bytes).unwrap();
    let machine = match open_machine(dir.path(), None, options(), CACHE_BYTES) {
        Ok(machine) => machine,
        Err(error) => {
            // Detected at open: fine, as long as the message names the engine.
            let message = error.to_string();
            assert!(message.contains(ENGINE_DIR_NAME), "{message}");
            return;
        }
    };
    let mut errors = 0;
    for i in 0..keys {
        match machine.get(format!("key{i:06}").as_bytes()) {
            Ok(value) => assert_eq!(value, expected[i as usize], "key{i:06} read back wrong"),
            Err(error) => {
                let message = error.to_string();
                assert!(
                    message.contains(&live(dir.path()).display().to_string()),
                    "the error names the engine: {message}"
                );
                errors += 1;
            }
        }
    }
    assert!(
        errors > 0,
        "the damaged block of {} was never detected",
        table.display()
    );
}

#[test]
fn a_flipped_byte_in_a_received_snapshot_is_refused_before_the_swap() {
    let entries = entries(300);
    let leader = replica(&entries, 300);
    let mut bytes = leader.snapshot();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    let dir = tempfile::tempdir().unwrap();
    let mut machine = open(dir.path());
    apply_range(&mut machine, &entries, 0, 100, 100);
    machine.commit_batch(true).unwrap();
    drop(machine);
    let snapshot = Snapshot {
        membership: Default::default(),
        meta: SnapshotMeta {
            index: 300,
            term: 1,
        },
        data: Arc::new(bytes),
    };
    let error = open_machine(dir.path(), Some(&snapshot), options(), CACHE_BYTES).unwrap_err();
    assert!(error.to_string().contains("checksum mismatch"), "{error}");
    // The live engine was not touched: it still opens at its own state.
    let reopened = open(dir.path());
    assert!(reopened == replica(&entries, 100));
}

/// The snapshot stream (src/kv/snapshot_stream.rs) carries a node's whole state: a state
/// machine's engine streamed in small chunks into another node's data directory, swapped in
/// and opened as a restart opens it, equals a replica at the same index — keys, sessions and
/// clock — and the restarted node goes on applying the log after it. A build cut before its
/// end (the process dies) leaves that node's old state, and the next start removes the
/// half-built directory.
#[test]
fn a_streamed_engine_opens_as_the_same_state_and_a_cut_stream_changes_nothing() {
    use kvstore_raft::kv::snapshot_stream::{SnapshotBuilder, SnapshotReader};
    let entries = entries(900);
    let leader = tempfile::tempdir().unwrap();
    let mut machine = open(leader.path());
    apply_range(&mut machine, &entries, 0, 500, 64);
    let view = machine.engine().unwrap().view();
    // Writes go on while the view is read.
    apply_range(&mut machine, &entries, 500, 600, 64);
    let mut chunks = Vec::new();
    let summary = SnapshotReader::new(view, 2048)
        .unwrap()
        .for_each_chunk(|chunk| {
            chunks.push(chunk.to_vec());
            Ok(())
        })
        .unwrap();
    assert_eq!(summary.meta.applied_index, 500);
    assert!(summary.sessions > 0 && chunks.len() > 10, "{summary:?}");

    let follower = tempfile::tempdir().unwrap();
    let mut old = open(follower.path());
    apply_range(&mut old, &entries, 0, 100, 64);
    drop(old);
    // Cut after half the chunks: the process dies, the old engine stays.
    let mut builder = SnapshotBuilder::new(&live(follower.path()), CACHE_BYTES).unwrap();
    for chunk in &chunks[..chunks.len() / 2] {
        builder.push(chunk).unwrap();
    }
    drop(builder);
    assert!(engine::incoming_dir(&live(follower.path())).exists());
    let reopened = open(follower.path());
    assert!(!engine::incoming_dir(&live(follower.path())).exists());
    assert!(reopened == replica(&entries, 100), "the old state, whole");
    drop(reopened);

    let mut builder = SnapshotBuilder::new(&live(follower.path()), CACHE_BYTES).unwrap();
    for chunk in &chunks {
        builder.push(chunk).unwrap();
    }
    builder.finish().unwrap().swap_in().unwrap();
    let streamed = open(follower.path());
    assert_eq!(streamed.applied_index(), 500);
    assert!(
        streamed == replica(&entries, 500),
        "the leader's state at 500"
    );
    drop(streamed);
    let compacted = Snapshot {
        membership: Default::default(),
        meta: SnapshotMeta {
            index: 500,
            term: 1,
        },
        data: Arc::new(Vec::new()),
    };
    let restarted = restart(follower.path(), Some(&compacted), &entries, 900);
    assert!(restarted == replica(&entries, 900));
}

// ------------------------------------------------------------- streamed InstallSnapshot

use kvstore_raft::kv::backup_source::EngineSlot;
use kvstore_raft::kv::snapshot_stream::ChunkCodec;
use kvstore_raft::kv::snapshot_transfer::EngineSnapshots;
use kvstore_raft::node::{ReceivedSnapshot, SnapshotStore};

/// Where a streamed install (`node/snapshot.rs`, `kv/snapshot_transfer.rs`) is cut.
#[derive(Clone, Copy, Debug)]
enum StreamCut {
    /// Half the chunks were written into `engine.incoming`.
    MidStream,
    /// Every chunk arrived and checked out; the incoming engine is durable, not swapped.
    BeforeSwap,
    /// The live engine was renamed to `.old`, the incoming one not yet renamed.
    BetweenRenames,
    /// The incoming engine is live, `.old` not yet removed.
    AfterRenames,
    /// Swapped in; the core has not yet recorded the snapshot (the snapshot file and the WAL
    /// are still the follower's old ones).
    BeforeTheCoreLearns,
}

/// A crash at every step of receiving and swapping in a streamed snapshot leaves the old
/// state or the new one, never a mix, and the restarted node catches up to a replica that
/// never crashed. Meanwhile the leader applies and checkpoints (its view does not move) and
/// the follower checkpoints its live engine (nothing of it leaks into the incoming one).
#[test]
fn a_crash_at_every_step_of_a_streamed_install_leaves_the_old_or_the_new_state() {
    crash_at_every_step_of_a_streamed_install(ChunkCodec::None);
}

/// The same with the chunks LZ4-compressed (stream version 2).
#[test]
fn a_crash_at_every_step_of_a_compressed_streamed_install_leaves_the_old_or_the_new_state() {
    crash_at_every_step_of_a_streamed_install(ChunkCodec::Lz4);
}

fn crash_at_every_step_of_a_streamed_install(codec: ChunkCodec) {
    let entries = entries(1_000);
    for cut in [
        StreamCut::MidStream,
        StreamCut::BeforeSwap,
        StreamCut::BetweenRenames,
        StreamCut::AfterRenames,
        StreamCut::BeforeTheCoreLearns,
    ] {
        let leader_dir = tempfile::tempdir().unwrap();
        let mut leader = open(leader_dir.path());
        apply_range(&mut leader, &entries, 0, 700, 64);
        let slot = Arc::new(EngineSlot::default());
        slot.set(leader.engine().cloned());
        let source = EngineSnapshots::new(
            Arc::clone(&slot),
            live(leader_dir.path()),
            CACHE_BYTES,
            codec,
        );
        let mut chunks = source.read(2048).unwrap();
        assert_eq!(chunks.applied_index(), 700);

        let follower_dir = tempfile::tempdir().unwrap();
        let mut follower = open(follower_dir.path());
        apply_range(&mut follower, &entries, 0, 300, 64);
        follower.commit_batch(true).unwrap();
        // The follower compacted its log at its checkpoint: a snapshot file without data.
        let old_snapshot = Snapshot {
            membership: Default::default(),
            meta: SnapshotMeta {
                index: 300,
                term: 1,
            },
            data: Arc::new(Vec::new()),
        };
        let target = EngineSnapshots::new(
            Arc::new(EngineSlot::default()),
            live(follower_dir.path()),
            CACHE_BYTES,
            ChunkCodec::None,
        );
        let mut intake = target.receive().unwrap();
        let (mut sent, mut leader_at) = (0, 700);
        while let Some(chunk) = chunks.next_chunk().unwrap() {
            intake.push(&chunk).unwrap();
            sent += 1;
            // The leader goes on applying and checkpointing (compacting) while it sends.
            if leader_at < 1_000 {
                apply_range(&mut leader, &entries, leader_at, leader_at + 50, 50);
                leader.commit_batch(true).unwrap();
                leader_at += 50;
            }
            if sent == 3 {
                // The follower's own checkpoint while it receives.
                follower.commit_batch(true).unwrap();
            }
            if matches!(cut, StreamCut::MidStream) && sent == 8 {
                break;
            }
        }
        assert!(sent >= 8, "{sent} chunks");
        drop(chunks);
        drop(follower);
        let live_dir = live(follower_dir.path());
        let (incoming, old) = (
            engine::incoming_dir(&live_dir),
            live_dir.with_extension("old"),
        );
        let received: Option<Box<dyn ReceivedSnapshot>> = match cut {
            StreamCut::MidStream => {
                assert!(!intake.is_complete());
                None
            }
            _ => Some(intake.finish().unwrap()),
        };
        match cut {
            StreamCut::BetweenRenames => std::fs::rename(&live_dir, &old).unwrap(),
            StreamCut::AfterRenames => {
                std::fs::rename(&live_dir, &old).unwrap();
                std::fs::rename(&incoming, &live_dir).unwrap();
            }
            StreamCut::BeforeTheCoreLearns => received.unwrap().swap_in().unwrap(),
            _ => {}
        }
        let new_state = matches!(
            cut,
            StreamCut::AfterRenames | StreamCut::BeforeTheCoreLearns
        );
        // The restart: the follower's snapshot file and WAL are the old ones (up to 300), so
        // after the swap the engine is ahead of its log (committed state: the log's entries
        // at or below it are skipped when they come).
        let restarted = open_machine(
            follower_dir.path(),
            Some(&old_snapshot),
            options(),
            CACHE_BYTES,
        )
        .unwrap();
        let (expected, at) = if new_state { (700, 700) } else { (300, 300) };
        assert_eq!(restarted.applied_index(), at, "cut {cut:?}");
        assert!(
            restarted == replica(&entries, expected),
            "cut {cut:?}: not the state at {expected}: a mix"
        );
        assert!(
            !incoming.exists() && !old.exists(),
            "cut {cut:?}: leftovers"
        );
        drop(restarted);
        // It then catches up (by the entries after 700, or by the snapshot again then the
        // entries) to a replica that never crashed.
        let mut caught_up = open(follower_dir.path());
        let from = caught_up.applied_index() as usize;
        if from < 700 {
            drop(caught_up);
            let mut again = target.receive().unwrap();
            let mut chunks = source.read(4096).unwrap();
            while let Some(chunk) = chunks.next_chunk().unwrap() {
                again.push(&chunk).unwrap();
            }
            // A new view: the leader's applied index now.
            let at = chunks.applied_index() as usize;
            drop(chunks);
            again.finish().unwrap().swap_in().unwrap();
            caught_up = open(follower_dir.path());
            assert_eq!(caught_up.applied_index() as usize, at);
        }
        let from = caught_up.applied_index() as usize;
        apply_range(&mut caught_up, &entries, from, 1_000, 64);
        assert!(
            caught_up == replica(&entries, 1_000),
            "cut {cut:?}: did not converge"
        );
    }
}

/// A byte flipped in one received chunk is found (the stream's CRC-32), named, and nothing
/// of it replaces the live engine.
#[test]
fn a_flipped_byte_in_a_streamed_chunk_is_named_and_nothing_is_swapped_in() {
    flipped_byte_in_a_streamed_chunk(ChunkCodec::None);
}

/// The same in a compressed chunk: the byte flipped is the block's last (LZ4 ends a block with
/// literals), so the block still unpacks, into records that differ from the leader's; the
/// stream's CRC-32, taken over the records unpacked, finds it.
#[test]
fn a_flipped_byte_in_a_compressed_chunk_is_named_and_nothing_is_swapped_in() {
    flipped_byte_in_a_streamed_chunk(ChunkCodec::Lz4);
}

fn flipped_byte_in_a_streamed_chunk(codec: ChunkCodec) {
    let entries = entries(600);
    let leader_dir = tempfile::tempdir().unwrap();
    let mut leader = open(leader_dir.path());
    apply_range(&mut leader, &entries, 0, 600, 64);
    let slot = Arc::new(EngineSlot::default());
    slot.set(leader.engine().cloned());
    let source = EngineSnapshots::new(slot, live(leader_dir.path()), CACHE_BYTES, codec);
    let mut chunks = source.read(2048).unwrap();
    let follower_dir = tempfile::tempdir().unwrap();
    let mut follower = open(follower_dir.path());
    apply_range(&mut follower, &entries, 0, 100, 64);
    drop(follower);
    let target = EngineSnapshots::new(
        Arc::new(EngineSlot::default()),
        live(follower_dir.path()),
        CACHE_BYTES,
        ChunkCodec::None,
    );
    let mut intake = target.receive().unwrap();
    let mut error = None;
    let mut number = 0;
    while let Some(mut chunk) = chunks.next_chunk().unwrap() {
        number += 1;
        if number == 4 {
            let at = match codec {
                ChunkCodec::None => chunk
                    .iter()
                    .rposition(|&b| b == b'x')
                    .expect("a value byte"),
                ChunkCodec::Lz4 => {
                    assert_eq!(chunk[0], 4, "chunk 4 is one compressed block");
                    chunk.len() - 1
                }
            };
            chunk[at] ^= 0x01;
        }
        if let Err(e) = intake.push(&chunk) {
            error = Some(e);
            break;
        }
    }
    let error = error.expect("the damage was not found");
    assert!(
        error.contains("checksum mismatch") && error.contains("engine.incoming"),
        "{error}"
    );
    assert!(!intake.is_complete());
    drop(intake);
    let reopened = open(follower_dir.path());
    assert!(reopened == replica(&entries, 100), "the old state, whole");
}

/// The apply thread swaps its engine only once every reader of it let go: a snapshot
/// sender's view keeps `retire` waiting (and then failing, naming the reader), and is
/// told to stop at its next chunk.
#[test]
fn the_engine_is_not_swapped_while_a_snapshot_sender_reads_it() {
    let entries = entries(300);
    let dir = tempfile::tempdir().unwrap();
    let mut machine = open(dir.path());
    apply_range(&mut machine, &entries, 0, 300, 64);
    let slot = Arc::new(EngineSlot::default());
    slot.set(machine.engine().cloned());
    let source = EngineSnapshots::new(
        Arc::clone(&slot),
        live(dir.path()),
        CACHE_BYTES,
        ChunkCodec::Lz4,
    );
    let mut chunks = source.read(1024).unwrap();
    chunks.next_chunk().unwrap().unwrap();
    let error = slot
        .retire(std::time::Duration::from_millis(50))
        .unwrap_err();
    assert!(error.contains("snapshot sender"), "{error}");
    let stopped = chunks.next_chunk().unwrap_err();
    assert!(stopped.contains("being replaced"), "{stopped}");
    assert!(source.read(1024).is_err(), "a view of a retired engine");
    drop(chunks);
    slot.retire(std::time::Duration::from_millis(50)).unwrap();
}
