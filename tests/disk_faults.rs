//! Disk faults against the storage layer (src/storage/), driven the way the
//! node drives it: batches of entries and hard states appended and fsynced
//! (from then on "acknowledged"), snapshots and compaction now and then, so
//! that segment rotation and segment deletion are crossed.
//!
//! A seeded workload records the data directory's bytes at every fsync
//! barrier. A *crash point* picks one step of the workload and builds the
//! directory a crash inside that step could leave: everything acknowledged
//! before the step, plus any prefix of what the step wrote but had not yet
//! made durable, sometimes followed by garbage or zeroes (a partly written
//! page); for a snapshot, one of the durable states that `save_snapshot`
//! passes through (temp file written, renamed, new segment, some old segments
//! deleted, old snapshot not yet deleted). Reopening must return every
//! acknowledged entry and hard state, cut the torn tail, never cut an
//! acknowledged byte, and give the same state when reopened again.
//!
//! Separately, a flipped byte inside any WAL record that is not the last one
//! must stop the open with a `Corrupt` error naming the file and the record's
//! offset, leaving every file as it was; a flipped byte inside the very last
//! record is, as src/storage documents, indistinguishable from a torn write
//! and is cut off like one. A flipped byte anywhere in the snapshot file
//! stops the open too. And a regression test for the one bug these found.
//!
//! tests/disk_faults_process.rs has the real-process half (failed and
//! stalled fsyncs through `kvserver --fault-file`); it is a separate test
//! binary because a child forked while a test here holds a directory lock
//! would hold that lock too until it execs.
//!
//! Environment: `DISK_CRASH_POINTS=N` (default 300) crash points in all,
//! spread over workloads of `CRASH_POINTS_PER_WORKLOAD` each; `DISK_SEED=S`
//! runs the workload with seed S only, and `DISK_CRASH_POINT=P` only its
//! crash point P. A failure prints the seed and crash point that replay it.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;

use kvstore_raft::raft::{Entry, HardState, RestoredState, Snapshot, SnapshotMeta, SplitMix64};
use kvstore_raft::storage::{DiskStorage, StorageError, StorageOptions};
use tempfile::TempDir;

/// Crash points drawn from one recorded workload; a workload costs a few
/// hundred fsyncs, a crash point three opens.
const CRASH_POINTS_PER_WORKLOAD: u64 = 30;
/// Steps of one workload: enough to cross several snapshots and dozens of
/// segment rotations with the small segments chosen below.
const WORKLOAD_STEPS: usize = 90;
const DEFAULT_CRASH_POINTS: u64 = 300;
/// Workload seeds start here unless `DISK_SEED` says otherwise.
const BASE_SEED: u64 = 0xd15c;
const DEFAULT_FLIPS: u64 = 600;
const DEFAULT_LAST_RECORD_FLIPS: u64 = 60;
const DEFAULT_SNAPSHOT_FLIPS: u64 = 200;
/// The longest run of garbage or zeroes put after a torn write.
const MAX_GARBAGE_BYTES: u64 = 600;

/// A data directory's files (all but the LOCK file) by name.
type Image = BTreeMap<String, Vec<u8>>;

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    Some(
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
    )
}

fn read_image(dir: &Path) -> Image {
    let mut image = Image::new();
    for item in fs::read_dir(dir).expect("list dir") {
        let path = item.expect("dir entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name != "LOCK" {
            image.insert(name, fs::read(&path).expect("read file"));
        }
    }
    image
}

fn write_image(dir: &Path, image: &Image) {
    for (name, bytes) in image {
        fs::write(dir.join(name), bytes).expect("write file");
    }
}

/// Without preallocation: the crash model here tears what a step appended to each file, so it
/// needs files that grow by appending. Preallocated segments (zeroes overwritten in place) are
/// tested in tests/storage.rs (`preallocated_*`).
fn options(segment_bytes: u64) -> StorageOptions {
    StorageOptions {
        segment_bytes,
        preallocate_bytes: 0,
        ..StorageOptions::default()
    }
}

/// What a correct storage returns at open: the model of the acknowledged
/// state. `entries` are those after the snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
struct State {
    hard_state: HardState,
    snapshot: Option<Snapshot>,
    entries: Vec<Entry>,
}

impl State {
    fn from_restored(restored: RestoredState) -> State {
        State {
            hard_state: restored.hard_state,
            snapshot: restored.snapshot,
            entries: restored.entries,
        }
    }

    fn snapshot_index(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.meta.index)
    }

    fn last_index(&self) -> u64 {
        self.entries
            .last()
            .map_or(self.snapshot_index(), |e| e.index)
    }

    /// The term of the entry at `index`, including the snapshot's last one.
    fn term_at(&self, index: u64) -> Option<u64> {
        match &self.snapshot {
            Some(s) if s.meta.index == index => Some(s.meta.term),
            _ => self
                .entries
                .iter()
                .find(|e| e.index == index)
                .map(|e| e.term),
        }
    }

    /// A one-line summary for failure messages.
    fn summary(&self) -> String {
        format!(
            "hard state {:?}, snapshot {:?}, entries {}..={}",
            self.hard_state,
            self.snapshot.as_ref().map(|s| s.meta),
            self.snapshot_index() + 1,
            self.last_index()
        )
    }
}

/// One recorded step of a workload, with the directory at its barriers.
enum Step {
    /// `append` + `sync` (or a reopen, which also only adds bytes and
    /// files): `written` is the directory after the write and before the
    /// fsync, `before` what was durable when the step began.
    Write {
        reopen: bool,
        before: Image,
        written: Image,
        old: State,
        new: State,
    },
    /// `save_snapshot`: the directory before and after the call.
    Snapshot {
        before: Image,
        after: Image,
        old: State,
        new: State,
    },
}

struct Workload {
    seed: u64,
    segment_bytes: u64,
    steps: Vec<Step>,
}

fn snapshot(index: u64, term: u64, step: usize) -> Snapshot {
    Snapshot {
        membership: Default::default(),
        meta: SnapshotMeta { index, term },
        data: Arc::new(format!("state machine at {index}, step {step}").into_bytes()),
    }
}

/// Runs a seeded node-like workload on a fresh directory and records it.
fn record_workload(seed: u64) -> Workload {
    let temp = TempDir::new().unwrap();
    let dir = temp.path();
    let mut rng = SplitMix64::new(seed);
    let segment_bytes = rng.range(200, 1500);
    let (mut storage, _) = DiskStorage::open(dir, options(segment_bytes)).expect("open");
    let mut model = State::default();
    let mut steps = Vec::new();
    for step in 0..WORKLOAD_STEPS {
        let before = read_image(dir);
        let old = model.clone();
        match rng.range(0, 25) {
            0..=19 => {
                let (hard_state, batch) = next_batch(&mut rng, &model, step);
                storage.append(Some(hard_state), &batch).expect("append");
                let written = read_image(dir);
                storage.sync().expect("sync");
                model.hard_state = hard_state;
                if let Some(first) = batch.first() {
                    model.entries.retain(|e| e.index < first.index);
                    model.entries.extend(batch);
                }
                steps.push(Step::Write {
                    reopen: false,
                    before,
                    written,
                    old,
                    new: model.clone(),
                });
            }
            20..=23 => {
                let Some(snap) = next_snapshot(&mut rng, &model, step) else {
                    continue;
                };
                storage.save_snapshot(&snap).expect("save_snapshot");
                let matches = model.term_at(snap.meta.index) == Some(snap.meta.term);
                if matches {
                    model.entries.retain(|e| e.index > snap.meta.index);
                } else {
                    model.entries.clear();
                }
                model.snapshot = Some(snap);
                steps.push(Step::Snapshot {
                    before,
                    after: read_image(dir),
                    old,
                    new: model.clone(),
                });
            }
            _ => {
                // A restart: open writes a fresh segment with a head.
                drop(storage);
                let (reopened, restored) =
                    DiskStorage::open(dir, options(segment_bytes)).expect("reopen");
                storage = reopened;
                assert_eq!(
                    State::from_restored(restored),
                    model,
                    "seed {seed} step {step}"
                );
                steps.push(Step::Write {
                    reopen: true,
                    before,
                    written: read_image(dir),
                    old: model.clone(),
                    new: model.clone(),
                });
            }
        }
    }
    let snapshots = steps
        .iter()
        .filter(|s| matches!(s, Step::Snapshot { .. }))
        .count();
    let last_segment = read_image(dir)
        .keys()
        .rev()
        .find(|n| n.starts_with("wal-"))
        .cloned();
    eprintln!(
        "workload {seed}: {} steps, {snapshots} snapshots, segment_bytes {segment_bytes}, \
         last segment {last_segment:?}",
        steps.len()
    );
    Workload {
        seed,
        segment_bytes,
        steps,
    }
}

/// The next append as Raft could issue it: sometimes a new term and vote,
/// sometimes an overwrite of a suffix, sometimes only a hard state.
fn next_batch(rng: &mut SplitMix64, model: &State, step: usize) -> (HardState, Vec<Entry>) {
    let mut hard_state = model.hard_state;
    if hard_state.term == 0 || rng.chance(1, 6) {
        hard_state.term += 1;
        hard_state.vote = rng.range(0, 4);
    }
    let first_allowed = model.snapshot_index() + 1;
    let last = model.last_index();
    let first = if last >= first_allowed && rng.chance(1, 6) {
        rng.range(first_allowed, last + 1)
    } else {
        last + 1
    };
    let term_before = model.term_at(first - 1).unwrap_or(0);
    let term = rng.range(term_before.max(1), hard_state.term + 1);
    let count = rng.range(0, 7);
    let batch: Vec<Entry> = (first..first + count)
        .map(|index| Entry {
            kind: Default::default(),
            index,
            term,
            data: vec![(step as u8) ^ (index as u8); rng.range(0, 200) as usize],
        })
        .collect();
    if rng.chance(1, 2) {
        hard_state.commit = rng.range(0, first + count);
    }
    (hard_state, batch)
}

/// A snapshot the application took (matching the log), or now and then one
/// from a leader that conflicts with it; `None` when the log has nothing new.
fn next_snapshot(rng: &mut SplitMix64, model: &State, step: usize) -> Option<Snapshot> {
    let snapshot_index = model.snapshot_index();
    let last = model.last_index();
    if model.hard_state.term == 0 {
        return None;
    }
    if rng.chance(1, 4) {
        let index = rng.range(snapshot_index + 1, last + 4);
        let term = model.hard_state.term;
        if model.term_at(index) != Some(term) {
            return Some(snapshot(index, term, step));
        }
    }
    if last <= snapshot_index {
        return None;
    }
    let index = rng.range(snapshot_index + 1, last + 1);
    Some(snapshot(
        index,
        model.term_at(index).expect("in the log"),
        step,
    ))
}

fn random_bytes(rng: &mut SplitMix64, len: u64) -> Vec<u8> {
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

/// A crash image and what recovery may return from it.
struct Crash {
    /// The kind of step and where in it, for the counts.
    kind: String,
    /// The details, for failure messages.
    what: String,
    image: Image,
    /// For each file: the bytes that were acknowledged (durable before the
    /// step), which recovery must never cut.
    acked: Image,
    /// For each file: what the step meant it to hold. Recovery may keep
    /// only a prefix of it (garbage after a torn write must go, unless it
    /// happens to equal what was meant).
    intended: Image,
    /// Acceptable recovered states: the first is the acknowledged one, the
    /// second what the whole step would have made durable.
    old: State,
    new: State,
    /// Which of the two recovery must return, if only one is right.
    must_be: Option<bool>,
    /// True for a write step (a torn batch), false for a snapshot.
    is_write: bool,
}

/// A torn copy of `written` over the durable `before`: a random prefix of the
/// new bytes, then maybe garbage or zeroes (only in a file that was written
/// to: a file with no unsynced bytes keeps its durable length). Returns the bytes and how many
/// of them are real.
fn tear(rng: &mut SplitMix64, before: &[u8], written: &[u8]) -> (Vec<u8>, usize) {
    assert!(
        written.starts_with(before),
        "a WAL segment changed other than by appending"
    );
    if written.len() == before.len() {
        // Nothing unsynced: the file is as durable as it was.
        return (written.to_vec(), written.len());
    }
    // A third of the time everything reached the disk (but was not yet
    // acknowledged), else any prefix of it did.
    let kept = if rng.chance(1, 3) {
        written.len()
    } else {
        rng.range(before.len() as u64, written.len() as u64 + 1) as usize
    };
    let mut bytes = written[..kept].to_vec();
    match rng.range(0, 3) {
        0 => {}
        1 => {
            let len = rng.range(1, MAX_GARBAGE_BYTES);
            bytes.extend(random_bytes(rng, len));
        }
        _ => {
            let len = rng.range(1, MAX_GARBAGE_BYTES);
            bytes.resize(bytes.len() + len as usize, 0);
        }
    }
    (bytes, kept)
}

/// A crash inside a write step: each file keeps what was durable plus a torn
/// part of what the step added; a file the step created may be missing.
fn crash_in_write(
    rng: &mut SplitMix64,
    before: &Image,
    written: &Image,
    old: &State,
    new: &State,
) -> Crash {
    let mut image = Image::new();
    let mut complete = true;
    for (name, bytes) in written {
        let durable = before.get(name);
        if !name.starts_with("wal-") {
            // Snapshot files are written whole before a step ends.
            assert_eq!(durable, Some(bytes), "a write step changed {name}");
            image.insert(name.clone(), bytes.clone());
            continue;
        }
        if durable.is_none() && rng.chance(1, 4) {
            complete = false;
            continue;
        }
        let durable = durable.map_or(&[][..], |b| &b[..]);
        let (torn, kept) = tear(rng, durable, bytes);
        complete &= kept == bytes.len() && torn.len() == kept;
        image.insert(name.clone(), torn);
    }
    for name in before.keys() {
        assert!(written.contains_key(name), "a write step deleted {name}");
    }
    Crash {
        kind: String::new(),
        what: format!("crash inside a write (complete: {complete})"),
        image,
        acked: before.clone(),
        intended: written.clone(),
        old: old.clone(),
        new: new.clone(),
        must_be: if complete || old == new {
            Some(true)
        } else {
            None
        },
        is_write: true,
    }
}

fn names_with_prefix<'a>(image: &'a Image, other: &'a Image, prefix: &str) -> Vec<&'a String> {
    image
        .keys()
        .filter(|name| name.starts_with(prefix) && !other.contains_key(*name))
        .collect()
}

/// A crash inside `save_snapshot`, at one of the durable states it passes
/// through, in order (each one implies the fsyncs before it):
/// 0. a temp file partly written; 1. the temp file complete, not renamed;
/// 2. renamed into place; 3. the fresh segment torn; 4. some of the covered
/// segments deleted; 5. all deleted, the older snapshot not yet; 6. done.
fn crash_in_snapshot(
    rng: &mut SplitMix64,
    before: &Image,
    after: &Image,
    old: &State,
    new: &State,
) -> Crash {
    let new_snapshot = names_with_prefix(after, before, "snap-");
    let new_segments = names_with_prefix(after, before, "wal-");
    let deleted_segments = names_with_prefix(before, after, "wal-");
    let old_snapshot = names_with_prefix(before, after, "snap-");
    assert_eq!(new_snapshot.len(), 1, "one new snapshot file");
    assert_eq!(new_segments.len(), 1, "one fresh segment");
    let snap_name = new_snapshot[0];
    let segment_name = new_segments[0];
    let meta = new
        .snapshot
        .as_ref()
        .expect("a snapshot step saves one")
        .meta;
    let source = if old.term_at(meta.index) == Some(meta.term) {
        "matching the log"
    } else {
        "leader's, replacing the log"
    };
    let stage = rng.range(0, 7);
    let mut image = before.clone();
    let snap_bytes = &after[snap_name];
    match stage {
        0 | 1 => {
            let len = if stage == 0 {
                rng.range(0, snap_bytes.len() as u64) as usize
            } else {
                snap_bytes.len()
            };
            image.insert(format!("{snap_name}.tmp"), snap_bytes[..len].to_vec());
        }
        _ => {
            image.insert(snap_name.clone(), snap_bytes.clone());
        }
    }
    if stage == 3 {
        let (torn, _) = tear(rng, &[], &after[segment_name]);
        image.insert(segment_name.clone(), torn);
    }
    if stage >= 4 {
        image.insert(segment_name.clone(), after[segment_name].clone());
        let deleted = if stage == 4 {
            rng.range(0, deleted_segments.len() as u64 + 1) as usize
        } else {
            deleted_segments.len()
        };
        for name in &deleted_segments[..deleted] {
            image.remove(*name);
        }
    }
    if stage == 6 {
        for name in &old_snapshot {
            image.remove(*name);
        }
    }
    let mut intended = before.clone();
    intended.extend(after.iter().map(|(n, b)| (n.clone(), b.clone())));
    Crash {
        kind: format!("save_snapshot ({source}) stage {stage}"),
        what: format!("crash inside save_snapshot at stage {stage}"),
        image,
        acked: before.clone(),
        intended,
        old: old.clone(),
        new: new.clone(),
        must_be: Some(stage >= 2),
        is_write: false,
    }
}

/// Opens `dir`, panicking with `context` if it fails.
fn open(dir: &Path, segment_bytes: u64, context: &str) -> (DiskStorage, State) {
    match DiskStorage::open(dir, options(segment_bytes)) {
        Ok((storage, restored)) => (storage, State::from_restored(restored)),
        Err(error) => panic!("{context}: open failed: {error}"),
    }
}

/// Recovers from `crash` and checks everything the module promises;
/// returns which of the acceptable states it recovered.
fn check_recovery(crash: &Crash, segment_bytes: u64, context: &str) -> &'static str {
    let context = format!("{context} ({})", crash.what);
    let temp = TempDir::new().unwrap();
    let dir = temp.path();
    write_image(dir, &crash.image);
    let (storage, first) = open(dir, segment_bytes, &context);
    // A write step logs term and vote before its entries and the commit
    // after them, so a torn write may also leave the new term and vote with
    // the old commit, with the old entries or with the new ones; never the
    // new commit over the old entries (see tests/sim_disk.rs, the torn batch).
    let head = HardState {
        commit: crash.old.hard_state.commit.min(crash.new.hard_state.commit),
        ..crash.new.hard_state
    };
    let head_only = State {
        hard_state: head,
        ..crash.old.clone()
    };
    let entries_without_commit = State {
        hard_state: head,
        ..crash.new.clone()
    };
    let (is_new, outcome) = if first == crash.new {
        (true, "whole step")
    } else if first == crash.old {
        (false, "acknowledged only")
    } else if crash.is_write && first == head_only {
        (false, "term and vote only")
    } else if crash.is_write && first == entries_without_commit {
        (true, "entries without the commit")
    } else {
        panic!(
            "{context}: recovered {}\nbut acknowledged was {}\nand the whole step {}",
            first.summary(),
            crash.old.summary(),
            crash.new.summary()
        );
    };
    if let Some(expected) = crash.must_be {
        assert_eq!(is_new, expected, "{context}: recovered {}", first.summary());
    }
    drop(storage);
    // What open left behind: torn tails cut, acknowledged bytes kept, no
    // temporary file.
    let opened = read_image(dir);
    for (name, bytes) in &crash.image {
        if !name.starts_with("wal-") {
            continue;
        }
        let now = &opened[name];
        assert!(bytes.starts_with(now), "{context}: open changed {name}");
        assert!(
            crash.intended[name].starts_with(now),
            "{context}: {name} keeps {} bytes that were never written",
            now.len()
        );
        if let Some(acked) = crash.acked.get(name) {
            assert!(
                now.starts_with(acked),
                "{context}: {name} was cut to {} bytes below the {} acknowledged",
                now.len(),
                acked.len()
            );
        }
    }
    assert!(
        opened.keys().all(|name| !name.ends_with(".tmp")),
        "{context}: a temporary file survived the open: {:?}",
        opened.keys()
    );
    // A second open finds nothing to repair and returns the same state;
    // the log is appendable and what is appended survives.
    let (mut storage, second) = open(dir, segment_bytes, &context);
    assert_eq!(second, first, "{context}: the second open differs");
    let reopened = read_image(dir);
    for (name, bytes) in &opened {
        assert_eq!(
            reopened.get(name),
            Some(bytes),
            "{context}: the second open changed {name}"
        );
    }
    let next = Entry {
        kind: Default::default(),
        index: first.last_index() + 1,
        term: first.hard_state.term,
        data: b"after recovery".to_vec(),
    };
    storage
        .append(None, std::slice::from_ref(&next))
        .expect("append");
    storage.sync().expect("sync");
    drop(storage);
    let (_storage, third) = open(dir, segment_bytes, &context);
    let mut expected = first;
    expected.entries.push(next);
    assert_eq!(
        third, expected,
        "{context}: an append after recovery was lost"
    );
    outcome
}

/// Crash point `point` of `workload`; returns what kind of step it hit and
/// what recovery returned.
fn run_crash_point(workload: &Workload, point: u64) -> String {
    let mut rng = SplitMix64::new(workload.seed.wrapping_mul(1_000_003) ^ point);
    // A third of the crash points go to snapshot steps, which are rarer
    // but have more stages.
    let snapshot_steps: Vec<usize> = (0..workload.steps.len())
        .filter(|&i| matches!(workload.steps[i], Step::Snapshot { .. }))
        .collect();
    let step_index = if !snapshot_steps.is_empty() && rng.chance(1, 3) {
        snapshot_steps[rng.range(0, snapshot_steps.len() as u64) as usize]
    } else {
        rng.range(0, workload.steps.len() as u64) as usize
    };
    let context = format!(
        "DISK_SEED={} DISK_CRASH_POINT={point} (step {step_index}, segment_bytes {})",
        workload.seed, workload.segment_bytes
    );
    let crash = match &workload.steps[step_index] {
        Step::Write {
            reopen,
            before,
            written,
            old,
            new,
        } => Crash {
            kind: if *reopen { "reopen" } else { "append" }.to_string(),
            ..crash_in_write(&mut rng, before, written, old, new)
        },
        Step::Snapshot {
            before,
            after,
            old,
            new,
        } => crash_in_snapshot(&mut rng, before, after, old, new),
    };
    let outcome = check_recovery(&crash, workload.segment_bytes, &context);
    format!("{}: {outcome}", crash.kind)
}

/// The workload seeds to run: `DISK_SEED` alone, or enough from the base
/// for `DISK_CRASH_POINTS`.
fn workload_seeds(total_points: u64) -> Vec<u64> {
    match env_u64("DISK_SEED") {
        Some(seed) => vec![seed],
        None => {
            let count = total_points.div_ceil(CRASH_POINTS_PER_WORKLOAD);
            (0..count).map(|i| BASE_SEED + i).collect()
        }
    }
}

#[test]
fn crash_points_lose_nothing_acknowledged() {
    let total_points = env_u64("DISK_CRASH_POINTS").unwrap_or(DEFAULT_CRASH_POINTS);
    let only_point = env_u64("DISK_CRASH_POINT");
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for (position, seed) in workload_seeds(total_points).into_iter().enumerate() {
        let workload = record_workload(seed);
        let left = total_points - position as u64 * CRASH_POINTS_PER_WORKLOAD;
        let points = match only_point {
            Some(point) => point..point + 1,
            None => 0..CRASH_POINTS_PER_WORKLOAD.min(left),
        };
        for point in points {
            *counts.entry(run_crash_point(&workload, point)).or_default() += 1;
        }
    }
    eprintln!("crash points checked, by step and recovered state:");
    for (kind, count) in &counts {
        eprintln!("  {kind}: {count}");
    }
    assert!(counts.values().sum::<u64>() > 0);
}

/// Where every record of a WAL segment starts and ends.
fn record_spans(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        let body_len = u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap());
        let end = offset + 8 + body_len as usize;
        assert!(
            end <= bytes.len(),
            "an acknowledged image has a torn record"
        );
        spans.push((offset, end));
        offset = end;
    }
    spans
}

/// The acknowledged images of a workload: the directory at each step start.
fn acked_images(workload: &Workload) -> Vec<&Image> {
    workload
        .steps
        .iter()
        .map(|step| match step {
            Step::Write { before, .. } | Step::Snapshot { before, .. } => before,
        })
        .collect()
}

/// Every record of `image` as (file, start, end), in log order.
fn all_records(image: &Image) -> Vec<(String, usize, usize)> {
    let mut records = Vec::new();
    for (name, bytes) in image.iter().filter(|(n, _)| n.starts_with("wal-")) {
        for (start, end) in record_spans(bytes) {
            records.push((name.clone(), start, end));
        }
    }
    records
}

fn flip(rng: &mut SplitMix64, bytes: &mut [u8], start: usize, end: usize) -> usize {
    let at = rng.range(start as u64, end as u64) as usize;
    bytes[at] ^= rng.range(1, 256) as u8;
    at
}

#[test]
fn flipped_byte_before_the_last_record_stops_the_open_untouched() {
    let flips = env_u64("DISK_FLIPS").unwrap_or(DEFAULT_FLIPS);
    let workloads: Vec<Workload> = (0..2)
        .map(|i| record_workload(BASE_SEED + 100 + i))
        .collect();
    let mut rng = SplitMix64::new(BASE_SEED);
    let mut done = 0;
    while done < flips {
        let workload = &workloads[rng.range(0, workloads.len() as u64) as usize];
        let images = acked_images(workload);
        let step = rng.range(1, images.len() as u64) as usize;
        let mut image = images[step].clone();
        let mut records = all_records(&image);
        records.pop();
        if records.is_empty() {
            continue;
        }
        let (name, start, end) = records[rng.range(0, records.len() as u64) as usize].clone();
        let at = flip(&mut rng, image.get_mut(&name).unwrap(), start, end);
        let context = format!(
            "flip {done}: seed {} step {step}: byte {at} of {name} (record {start}..{end})",
            workload.seed
        );
        let temp = TempDir::new().unwrap();
        write_image(temp.path(), &image);
        let error = match DiskStorage::open(temp.path(), options(workload.segment_bytes)) {
            Ok(_) => panic!("{context}: open succeeded"),
            Err(error) => error,
        };
        match &error {
            StorageError::Corrupt { path, offset, .. } => {
                assert_eq!(path, &temp.path().join(&name), "{context}: {error}");
                assert_eq!(*offset, start as u64, "{context}: {error}");
            }
            other => panic!("{context}: not a corruption error: {other}"),
        }
        let message = error.to_string();
        assert!(
            message.contains(&name) && message.contains(&format!("at offset {start}")),
            "{context}: {message}"
        );
        assert_eq!(
            read_image(temp.path()),
            image,
            "{context}: a failed open modified the directory"
        );
        done += 1;
    }
    eprintln!("{done} flipped bytes, each refused with file and offset");
}

/// A flipped byte anywhere in the newest snapshot file (header or data)
/// stops the open with a `Corrupt` error naming that file, and changes
/// nothing: the snapshot is written whole under a temporary name and renamed,
/// so unlike the WAL's tail it has no torn state to forgive.
#[test]
fn flipped_byte_in_the_snapshot_file_stops_the_open_untouched() {
    let workload = record_workload(BASE_SEED + 400);
    let images: Vec<&Image> = acked_images(&workload)
        .into_iter()
        .filter(|image| image.keys().any(|n| n.starts_with("snap-")))
        .collect();
    assert!(!images.is_empty(), "the workload took no snapshot");
    let mut rng = SplitMix64::new(BASE_SEED + 2);
    for trial in 0..DEFAULT_SNAPSHOT_FLIPS {
        let mut image = images[rng.range(0, images.len() as u64) as usize].clone();
        let name = image
            .keys()
            .find(|n| n.starts_with("snap-"))
            .unwrap()
            .clone();
        let bytes = image.get_mut(&name).unwrap();
        let len = bytes.len();
        let at = flip(&mut rng, bytes, 0, len);
        let context = format!("trial {trial}: byte {at} of {name}");
        let temp = TempDir::new().unwrap();
        write_image(temp.path(), &image);
        match DiskStorage::open(temp.path(), options(workload.segment_bytes)) {
            Err(StorageError::Corrupt { path, .. }) => {
                assert_eq!(path, temp.path().join(&name), "{context}")
            }
            Err(other) => panic!("{context}: not a corruption error: {other}"),
            Ok(_) => panic!("{context}: open succeeded"),
        }
        assert_eq!(read_image(temp.path()), image, "{context}: modified");
    }
}

/// A flipped byte inside the very last record of the WAL cannot be told from
/// a write torn by a crash (its length may be whole and its checksum wrong
/// either way), and src/storage documents that such a tail is cut off: so
/// the open succeeds and returns exactly what the log without that record
/// holds, and the file is cut at the record's start.
#[test]
fn flipped_byte_in_the_last_record_is_cut_as_a_torn_tail() {
    let workload = record_workload(BASE_SEED + 200);
    let images = acked_images(&workload);
    let mut rng = SplitMix64::new(BASE_SEED + 1);
    for trial in 0..DEFAULT_LAST_RECORD_FLIPS {
        let step = rng.range(1, images.len() as u64) as usize;
        let pristine = images[step];
        let (name, start, end) = all_records(pristine).pop().expect("a record");
        let mut flipped = pristine.clone();
        let at = flip(&mut rng, flipped.get_mut(&name).unwrap(), start, end);
        let mut cut = pristine.clone();
        cut.get_mut(&name).unwrap().truncate(start);
        let context = format!(
            "trial {trial}: seed {} step {step}: byte {at} of {name} (record {start}..{end})",
            workload.seed
        );
        let flipped_dir = TempDir::new().unwrap();
        write_image(flipped_dir.path(), &flipped);
        let cut_dir = TempDir::new().unwrap();
        write_image(cut_dir.path(), &cut);
        let (_a, from_flipped) = open(flipped_dir.path(), workload.segment_bytes, &context);
        let (_b, from_cut) = open(cut_dir.path(), workload.segment_bytes, &context);
        assert_eq!(from_flipped, from_cut, "{context}");
        let now = fs::read(flipped_dir.path().join(&name)).unwrap();
        assert_eq!(now.len(), start, "{context}: not cut at the record");
    }
}

/// Out-of-order writeback can leave a hole (zeroes) inside the unsynced
/// tail with an intact unsynced record after it. Without knowing where the
/// last fsync ended, that looks exactly like a damaged acknowledged record
/// followed by others, so the open refuses (losing nothing, changing
/// nothing) rather than guess; the operator decides.
#[test]
fn hole_before_an_intact_record_in_the_tail_is_refused() {
    let workload = record_workload(BASE_SEED + 300);
    // The newest image whose last segment holds at least two records.
    let (pristine, name, start, end) = acked_images(&workload)
        .into_iter()
        .rev()
        .find_map(|image| {
            let records = all_records(image);
            let [.., (name, start, end), (last_name, _, _)] = &records[..] else {
                return None;
            };
            (name == last_name).then(|| (image, name.clone(), *start, *end))
        })
        .expect("a segment with two records");
    let mut image = pristine.clone();
    image.get_mut(&name).unwrap()[start..end].fill(0);
    let temp = TempDir::new().unwrap();
    write_image(temp.path(), &image);
    let Err(error) = DiskStorage::open(temp.path(), options(workload.segment_bytes)) else {
        panic!("open succeeded");
    };
    let message = error.to_string();
    assert!(
        message.contains(&name)
            && message.contains(&format!("at offset {start}"))
            && message.contains("intact record follows"),
        "{message}"
    );
    assert_eq!(read_image(temp.path()), image);
}

/// Regression: a snapshot from the leader beyond the end of the stored log,
/// and a crash after its file was renamed into place but before the reset
/// record was logged. Recovery must log the reset itself: without it, the
/// entries appended after the snapshot follow the old, shorter log (or an
/// older reset) with a gap, and the *next* open refused the directory as
/// corrupt ("entry 10 follows entry 5: entries are missing", "entry 10
/// follows a reset to the snapshot at index 4") although nothing was lost.
/// Found by crash points DISK_SEED=53606 DISK_CRASH_POINT=5 and
/// DISK_SEED=53645 DISK_CRASH_POINT=2.
#[test]
fn crash_after_renaming_a_snapshot_beyond_the_log_is_repaired() {
    fn entries(first: u64, last: u64) -> Vec<Entry> {
        (first..=last)
            .map(|index| Entry {
                kind: Default::default(),
                index,
                term: 2,
                data: vec![index as u8; 9],
            })
            .collect()
    }
    // The log before the crash: entries 1..=5; or no entries after a reset
    // to an older snapshot at 4.
    type Setup = fn(&mut DiskStorage);
    let setups: [(&str, Setup); 2] = [
        ("entries", |storage| {
            storage.append(None, &entries(1, 5)).unwrap();
        }),
        ("an older reset", |storage| {
            storage.save_snapshot(&snapshot(4, 2, 0)).unwrap();
        }),
    ];
    let hard_state = HardState {
        term: 2,
        vote: 1,
        commit: 3,
    };
    for (what, setup) in setups {
        let temp = TempDir::new().unwrap();
        let donor = TempDir::new().unwrap();
        {
            let (mut storage, _) = open(donor.path(), 1 << 20, "donor");
            storage.append(Some(hard_state), &[]).unwrap();
            storage.save_snapshot(&snapshot(8, 2, 0)).unwrap();
        }
        {
            let (mut storage, _) = open(temp.path(), 1 << 20, what);
            storage.append(Some(hard_state), &[]).unwrap();
            setup(&mut storage);
            storage.sync().unwrap();
        }
        // The crash: the leader's snapshot at 8 is in place, nothing else.
        let donor_image = read_image(donor.path());
        let snap_name = donor_image.keys().find(|n| n.starts_with("snap-")).unwrap();
        fs::write(temp.path().join(snap_name), &donor_image[snap_name]).unwrap();
        {
            let (mut storage, restored) = open(temp.path(), 1 << 20, what);
            assert_eq!(restored.snapshot, Some(snapshot(8, 2, 0)), "{what}");
            assert!(
                restored.entries.is_empty(),
                "{what}: {:?}",
                restored.entries
            );
            storage.append(None, &entries(9, 10)).unwrap();
            storage.sync().unwrap();
        }
        let (_storage, restored) = open(temp.path(), 1 << 20, what);
        assert_eq!(restored.entries, entries(9, 10), "{what}");
    }
}
