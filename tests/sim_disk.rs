//! The storage layer on a disk that forgets (`SimFs`): what survives a power
//! loss is only what completed fsyncs covered — of the files' bytes and of
//! the directories' entries — so these tests can tell a real fsync from
//! none, which no `kill -9` on a real file system can (the page cache
//! survives it).
//!
//! - Crash points: a seeded workload of appends (with term changes,
//!   overwrites of uncommitted suffixes and commit advances), snapshots and
//!   segment rotations is cut after every one of its mutating disk calls, the
//!   power fails (keeping nothing unsynced, a random prefix of the unsynced
//!   writes, or a torn one), and the reopened storage must hold every
//!   acknowledged entry, hard state and snapshot, never an entry at or
//!   below its commit index that differs from the committed one, and reopen
//!   to the same state again.
//! - The torn batch: a hard state whose commit covers entries of the same
//!   batch must not reach the disk ahead of them (a regression test: the
//!   hard-state record used to precede the entries record).
//!
//! `SIM_DISK_SEEDS=N` runs N workloads (default 3); `SIM_DISK_SEED=S` one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvstore_raft::raft::{Entry, HardState, RestoredState, Snapshot, SnapshotMeta, SplitMix64};
use kvstore_raft::storage::{DiskStorage, PowerLoss, SimFs, StorageOptions};

const STEPS: usize = 70;
/// Small segments, so that the workload rolls and deletes many of them.
const SEGMENT_BYTES: u64 = 400;

fn options(fs: &SimFs, segment_bytes: u64) -> StorageOptions {
    StorageOptions {
        segment_bytes,
        fs: Arc::new(fs.clone()),
        ..StorageOptions::default()
    }
}

fn data_dir() -> PathBuf {
    PathBuf::from("/sim/node1")
}

fn open(fs: &SimFs, dir: &Path, context: &str) -> (DiskStorage, RestoredState) {
    match DiskStorage::open(dir, options(fs, SEGMENT_BYTES)) {
        Ok(opened) => opened,
        Err(error) => panic!("{context}: reopen after the power loss failed: {error}"),
    }
}

fn entry(index: u64, term: u64, tag: u64) -> Entry {
    Entry {
        kind: Default::default(),
        index,
        term,
        data: format!("entry {index} term {term} #{tag}").into_bytes(),
    }
}

/// The durable state a correct storage must return.
#[derive(Clone, Debug, Default)]
struct Model {
    hard_state: HardState,
    snapshot: Option<SnapshotMeta>,
    /// The whole log from index 1 (entries under the snapshot included).
    log: Vec<Entry>,
}

impl Model {
    fn last_index(&self) -> u64 {
        self.log.len() as u64
    }
    fn term_at(&self, index: u64) -> u64 {
        self.log[index as usize - 1].term
    }
}

enum Step {
    Append(HardState, Vec<Entry>),
    Snapshot(Snapshot),
}

/// A Raft-legal workload: terms and votes move forward, only entries above
/// the commit index are overwritten, commit never passes the log's end,
/// snapshots are taken at committed indexes.
fn workload(seed: u64) -> Vec<(Step, Model)> {
    let mut rng = SplitMix64::new(seed);
    let mut model = Model::default();
    let mut steps = Vec::new();
    for tag in 0..STEPS as u64 {
        let snapshot_index = model.snapshot.map_or(0, |s| s.index);
        let commit = model.hard_state.commit;
        if commit > snapshot_index && rng.chance(1, 7) {
            let index = rng.range(snapshot_index + 1, commit + 1);
            let meta = SnapshotMeta {
                index,
                term: model.term_at(index),
            };
            model.snapshot = Some(meta);
            let data = Arc::new(format!("state at {index} #{tag}").into_bytes());
            steps.push((
                Step::Snapshot(Snapshot {
                    membership: Default::default(),
                    meta,
                    data,
                }),
                model.clone(),
            ));
            continue;
        }
        let mut hard_state = model.hard_state;
        if rng.chance(1, 5) {
            hard_state.term += 1;
            hard_state.vote = rng.range(0, 4);
        }
        let last = model.last_index();
        let first = if last > commit && rng.chance(1, 3) {
            rng.range(commit.max(snapshot_index) + 1, last + 1)
        } else {
            last + 1
        };
        let count = rng.range(0, 5);
        let entries: Vec<Entry> = (first..first + count)
            .map(|index| entry(index, hard_state.term, tag))
            .collect();
        if !entries.is_empty() {
            model.log.truncate(first as usize - 1);
            model.log.extend(entries.iter().cloned());
        }
        let new_last = model.last_index();
        if new_last > commit && rng.chance(2, 3) {
            hard_state.commit = rng.range(commit + 1, new_last + 1);
        }
        model.hard_state = hard_state;
        steps.push((Step::Append(hard_state, entries), model.clone()));
    }
    steps
}

/// Runs the workload on `fs` until the disk dies; returns the last
/// acknowledged model and the one being written when it died.
fn run(fs: &SimFs, steps: &[(Step, Model)]) -> (Model, Model) {
    let dir = data_dir();
    let mut acked = Model::default();
    let Ok((mut storage, _)) = DiskStorage::open(&dir, options(fs, SEGMENT_BYTES)) else {
        return (acked.clone(), acked);
    };
    for (step, after) in steps {
        let result = match step {
            Step::Append(hard_state, entries) => storage
                .append(Some(*hard_state), entries)
                .and_then(|()| storage.sync()),
            Step::Snapshot(snapshot) => storage.save_snapshot(snapshot),
        };
        if result.is_err() {
            return (acked, after.clone());
        }
        acked = after.clone();
    }
    (acked.clone(), acked)
}

/// The restored log as `(index, entry)` pairs above the snapshot.
fn check_restored(restored: &RestoredState, acked: &Model, attempted: &Model, context: &str) {
    let hs = restored.hard_state;
    assert!(
        hs.term >= acked.hard_state.term,
        "{context}: term went back from {} to {}",
        acked.hard_state.term,
        hs.term
    );
    if hs.term == acked.hard_state.term && acked.hard_state.vote != 0 {
        assert_eq!(hs.vote, acked.hard_state.vote, "{context}: vote lost");
    }
    let snapshot = restored.snapshot.as_ref().map(|s| s.meta);
    if let Some(acked_snapshot) = acked.snapshot {
        let index = snapshot.map_or(0, |s| s.index);
        assert!(
            index >= acked_snapshot.index,
            "{context}: the acknowledged snapshot at {} is lost (restored: {snapshot:?})",
            acked_snapshot.index
        );
    }
    if let Some(meta) = snapshot {
        assert!(
            Some(meta) == acked.snapshot || Some(meta) == attempted.snapshot,
            "{context}: restored snapshot {meta:?} was never written"
        );
    }
    // The log above the snapshot is the acknowledged one or the one being
    // written (its records are atomic), never a mix or garbage.
    let base = snapshot.map_or(0, |s| s.index) as usize;
    let tail_of = |model: &Model| model.log.get(base..).map(|s| s.to_vec());
    let restored_tail = Some(restored.entries.clone());
    assert!(
        restored_tail == tail_of(acked) || restored_tail == tail_of(attempted),
        "{context}: restored log {:?} is neither the acknowledged {:?} nor the attempted {:?}",
        summary(&restored.entries),
        tail_of(acked).map(|t| summary(&t)),
        tail_of(attempted).map(|t| summary(&t)),
    );
    // Committed entries are final: whatever the restored commit covers must
    // be what the newest model has there (the torn-batch bug broke this).
    let last = base as u64 + restored.entries.len() as u64;
    for index in base as u64 + 1..=hs.commit.min(last) {
        let stored = &restored.entries[index as usize - base - 1];
        assert_eq!(
            Some(stored),
            attempted.log.get(index as usize - 1),
            "{context}: entry {index} is at or below the restored commit {} but is not \
             the committed entry (term {} stored)",
            hs.commit,
            stored.term
        );
    }
}

fn summary(entries: &[Entry]) -> Vec<(u64, u64)> {
    entries.iter().map(|e| (e.index, e.term)).collect()
}

fn seeds() -> Vec<u64> {
    if let Some(seed) = std::env::var("SIM_DISK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![seed];
    }
    let count = std::env::var("SIM_DISK_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3u64);
    (0..count).map(|k| 0x5d15c + k).collect()
}

#[test]
fn power_loss_after_any_disk_call_keeps_everything_acknowledged() {
    let mut crash_points = 0;
    for seed in seeds() {
        let steps = workload(seed);
        let dry = SimFs::new();
        let (all, _) = run(&dry, &steps);
        assert_eq!(
            all.log,
            steps.last().unwrap().1.log,
            "the dry run completes"
        );
        let total_ops = dry.counters().mutating_ops;
        assert!(
            dry.counters().power_losses == 0 && total_ops > 100,
            "a workload of {total_ops} disk calls is too small to mean much"
        );
        for ops in 0..=total_ops {
            let modes = [
                PowerLoss::Strict,
                PowerLoss::TornPrefix { seed: ops },
                PowerLoss::TornPrefix { seed: ops ^ 0xffff },
            ];
            for mode in modes {
                let context = format!(
                    "seed {seed}, disk dies after {ops} of {total_ops} calls, {mode:?} \
                     (replay: SIM_DISK_SEED={seed})"
                );
                let fs = SimFs::new();
                fs.crash_after_ops(ops);
                let (acked, attempted) = run(&fs, &steps);
                fs.power_loss(mode);
                let (storage, restored) = open(&fs, &data_dir(), &context);
                check_restored(&restored, &acked, &attempted, &context);
                drop(storage);
                // Opening again (after the repairs of the first open) gives
                // the same state.
                let (_storage, again) = open(&fs, &data_dir(), &context);
                assert_eq!(again.hard_state, restored.hard_state, "{context}: reopen");
                assert_eq!(again.entries, restored.entries, "{context}: reopen");
                crash_points += 1;
            }
        }
    }
    assert!(crash_points > 0);
}

/// The power fails while the batch `[hard state: term 2, commit 8][entries
/// 6-8 of term 2]` overwriting the uncommitted term-1 entries 6-10 is being
/// written: whatever prefix of it reaches the disk, the node must not come
/// back with commit 8 over the stale term-1 entries 6-8 (it would apply
/// them: its state machine would diverge).
#[test]
fn a_torn_batch_never_commits_the_entries_it_overwrites() {
    let dir = data_dir();
    let run_1 = |first: u64, last: u64, term: u64| -> Vec<Entry> {
        (first..=last).map(|i| entry(i, term, 0)).collect()
    };
    let setup = || {
        let fs = SimFs::new();
        let (mut storage, _) = DiskStorage::open(&dir, options(&fs, 1 << 20)).expect("open");
        let first = HardState {
            term: 1,
            vote: 1,
            commit: 5,
        };
        storage.append(Some(first), &run_1(1, 10, 1)).unwrap();
        storage.sync().unwrap();
        let before: usize = fs.files(&dir).values().map(Vec::len).sum();
        let next = HardState {
            term: 2,
            vote: 0,
            commit: 8,
        };
        storage.append(Some(next), &run_1(6, 8, 2)).unwrap();
        let after: usize = fs.files(&dir).values().map(Vec::len).sum();
        drop(storage);
        (fs, after - before)
    };
    let (_, batch_bytes) = setup();
    assert!(batch_bytes > 0);
    for kept in 0..=batch_bytes as u64 {
        let (fs, _) = setup();
        fs.power_loss(PowerLoss::KeepUnsyncedBytes { bytes: kept });
        let (_storage, restored) = open(&fs, &dir, "torn batch");
        let commit = restored.hard_state.commit;
        let stale: Vec<u64> = restored
            .entries
            .iter()
            .filter(|e| e.index >= 6 && e.index <= commit && e.term != 2)
            .map(|e| e.index)
            .collect();
        assert!(
            stale.is_empty(),
            "{kept} of the batch's {batch_bytes} bytes reached the disk: commit {commit} \
             covers the overwritten term-1 entries {stale:?}"
        );
    }
}

/// An fsynced file whose directory entry was never fsynced is lost with it:
/// the simulated disk itself must behave so, or the tests above prove nothing.
#[test]
fn the_simulated_disk_forgets_what_no_fsync_covered() {
    use kvstore_raft::storage::FileSystem;
    let fs = SimFs::new();
    let dir = PathBuf::from("/sim/d");
    fs.create_dir_all(&dir).unwrap();
    let mut a = fs.create_new(&dir.join("a")).unwrap();
    a.write_all(b"synced").unwrap();
    a.sync_data().unwrap();
    a.write_all(b" and not").unwrap();
    fs.power_loss(PowerLoss::Strict);
    assert!(fs.files(&dir).is_empty(), "the entry was never fsynced");
    assert!(a.write_all(b"x").is_err(), "handles die with the power");

    let mut b = fs.create_new(&dir.join("b")).unwrap();
    fs.sync_dir(&dir).unwrap();
    b.write_all(b"synced").unwrap();
    b.sync_data().unwrap();
    b.write_all(b" and not").unwrap();
    fs.rename(&dir.join("b"), &dir.join("c")).unwrap();
    fs.power_loss(PowerLoss::Strict);
    let files = fs.files(&dir);
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        vec!["b"],
        "rename not durable"
    );
    assert_eq!(files["b"], b"synced");

    let mut d = fs.create_new(&dir.join("d")).unwrap();
    fs.sync_dir(&dir).unwrap();
    d.write_all(b"0123456789").unwrap();
    fs.power_loss(PowerLoss::KeepUnsyncedBytes { bytes: 4 });
    assert_eq!(fs.files(&dir)["d"], b"0123");

    fs.crash_after_ops(1);
    fs.remove_file(&dir.join("d")).unwrap();
    assert!(fs.remove_file(&dir.join("b")).is_err(), "the disk died");
    assert!(fs.is_dead());
    fs.power_loss(PowerLoss::Strict);
    assert_eq!(fs.files(&dir).len(), 2, "the unsynced delete is undone");
}
