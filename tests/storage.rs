//! Tests of the durability layer (src/storage/): what `DiskStorage::open`
//! returns after appends, overwrites, snapshots and segment rollover, and
//! how it treats damage: a torn tail is cut off, anything else stops the
//! open with an error naming the file, and leaves every byte as it was.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvstore_raft::raft::{Entry, HardState, RestoredState, Snapshot, SnapshotMeta, SplitMix64};
use kvstore_raft::storage::{DiskStorage, FaultFile, StorageError, StorageOptions};
use tempfile::TempDir;

/// Without preallocation: these tests read segment lengths as record boundaries (a file
/// grows by each append). Preallocated segments have their own tests (`preallocated_*`).
fn options(segment_bytes: u64) -> StorageOptions {
    StorageOptions {
        segment_bytes,
        preallocate_bytes: 0,
        ..StorageOptions::default()
    }
}

/// With the production default preallocation (`StorageOptions::default`).
fn preallocating(segment_bytes: u64) -> StorageOptions {
    StorageOptions {
        segment_bytes,
        ..StorageOptions::default()
    }
}

fn open(dir: &Path, segment_bytes: u64) -> (DiskStorage, RestoredState) {
    match DiskStorage::open(dir, options(segment_bytes)) {
        Ok(opened) => opened,
        Err(error) => panic!("open {}: {error}", dir.display()),
    }
}

fn open_err(dir: &Path, segment_bytes: u64) -> StorageError {
    match DiskStorage::open(dir, options(segment_bytes)) {
        Ok(_) => panic!("open {} succeeded but should have failed", dir.display()),
        Err(error) => error,
    }
}

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        kind: Default::default(),
        index,
        term,
        data: format!("entry {index} of term {term}").into_bytes(),
    }
}

/// Entries `first..=last`, all of `term`.
fn run(first: u64, last: u64, term: u64) -> Vec<Entry> {
    (first..=last).map(|index| entry(index, term)).collect()
}

fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
    HardState { term, vote, commit }
}

fn snapshot(index: u64, term: u64) -> Snapshot {
    Snapshot {
        membership: Default::default(),
        meta: SnapshotMeta { index, term },
        data: Arc::new(format!("state machine at {index}").into_bytes()),
    }
}

fn append_sync(storage: &mut DiskStorage, hard_state: Option<HardState>, entries: &[Entry]) {
    storage.append(hard_state, entries).expect("append");
    storage.sync().expect("sync");
}

fn files_with_prefix(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .expect("list dir")
        .map(|item| item.expect("dir entry").path())
        .filter(|path| {
            let name = path.file_name().unwrap().to_string_lossy();
            name.starts_with(prefix)
        })
        .collect();
    paths.sort();
    paths
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    files_with_prefix(dir, "wal-")
}

/// Every file's bytes, by name: compared before and after a failed open.
fn dir_contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    files_with_prefix(dir, "")
        .into_iter()
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, fs::read(&path).expect("read file"))
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    for path in files_with_prefix(from, "") {
        fs::copy(&path, to.join(path.file_name().unwrap())).expect("copy file");
    }
}

fn flip_byte(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).expect("read");
    bytes[offset as usize] ^= 0x5a;
    fs::write(path, bytes).expect("write");
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// Asserts that opening `dir` fails with a message containing every one of
/// `needles`, and that the open left every file's bytes unchanged.
fn assert_open_fails_untouched(dir: &Path, segment_bytes: u64, needles: &[&str]) -> String {
    let before = dir_contents(dir);
    let message = open_err(dir, segment_bytes).to_string();
    for needle in needles {
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    }
    assert_eq!(
        dir_contents(dir),
        before,
        "a failed open modified the directory"
    );
    message
}

#[test]
fn round_trip_across_reopen() {
    let temp = TempDir::new().unwrap();
    let dir = temp.path().join("data");
    {
        let (mut storage, restored) = open(&dir, 1 << 20);
        assert_eq!(restored.hard_state, HardState::default());
        assert!(restored.snapshot.is_none() && restored.entries.is_empty());
        assert_eq!((storage.first_index(), storage.last_index()), (1, 0));
        append_sync(&mut storage, Some(hard_state(1, 1, 0)), &run(1, 5, 1));
        append_sync(&mut storage, Some(hard_state(1, 1, 3)), &[]);
        assert_eq!((storage.first_index(), storage.last_index()), (1, 5));
    }
    {
        let (mut storage, restored) = open(&dir, 1 << 20);
        assert_eq!(restored.hard_state, hard_state(1, 1, 3));
        assert_eq!(restored.entries, run(1, 5, 1));
        assert_eq!(storage.last_index(), 5);
        assert_eq!(storage.hard_state(), hard_state(1, 1, 3));
        append_sync(&mut storage, Some(hard_state(2, 0, 5)), &run(6, 8, 2));
    }
    let (_storage, restored) = open(&dir, 1 << 20);
    assert_eq!(restored.hard_state, hard_state(2, 0, 5));
    let mut expected = run(1, 5, 1);
    expected.extend(run(6, 8, 2));
    assert_eq!(restored.entries, expected);
}

#[test]
fn overwrite_of_a_suffix() {
    let temp = TempDir::new().unwrap();
    // Small segments, so the overwrite starts in an older segment than the
    // one it is written to.
    let segment_bytes = 300;
    {
        let (mut storage, _) = open(temp.path(), segment_bytes);
        storage.append(Some(hard_state(1, 1, 0)), &[]).unwrap();
        for index in 1..=20 {
            append_sync(&mut storage, None, &[entry(index, 1)]);
        }
        assert!(segments(temp.path()).len() > 3);
        append_sync(&mut storage, Some(hard_state(3, 2, 4)), &run(6, 9, 3));
        assert_eq!(storage.last_index(), 9);
    }
    let (mut storage, restored) = open(temp.path(), segment_bytes);
    let mut expected = run(1, 5, 1);
    expected.extend(run(6, 9, 3));
    assert_eq!(restored.entries, expected);
    assert_eq!(restored.hard_state, hard_state(3, 2, 4));
    // Overwrite again at the very end, then reopen once more.
    append_sync(&mut storage, Some(hard_state(4, 1, 4)), &[entry(9, 4)]);
    drop(storage);
    let (_storage, restored) = open(temp.path(), segment_bytes);
    expected[8] = entry(9, 4);
    assert_eq!(restored.entries, expected);
}

#[test]
fn hard_state_survives_segment_deletion() {
    let temp = TempDir::new().unwrap();
    let segment_bytes = 256;
    {
        let (mut storage, _) = open(temp.path(), segment_bytes);
        append_sync(&mut storage, Some(hard_state(5, 2, 0)), &[]);
        for index in 1..=200 {
            append_sync(&mut storage, None, &[entry(index, 5)]);
        }
        let before = segments(temp.path()).len();
        assert!(before > 20, "{before} segments");
        storage.save_snapshot(&snapshot(200, 5)).unwrap();
        let after = segments(temp.path());
        assert!(after.len() <= 2, "{after:?} left after the snapshot");
        assert_eq!(storage.first_index(), 201);
        assert_eq!(storage.last_index(), 200);
    }
    let (storage, restored) = open(temp.path(), segment_bytes);
    assert_eq!(restored.hard_state, hard_state(5, 2, 0));
    assert_eq!(restored.snapshot, Some(snapshot(200, 5)));
    assert!(restored.entries.is_empty());
    assert_eq!(
        storage.snapshot_meta(),
        Some(SnapshotMeta {
            index: 200,
            term: 5
        })
    );
}

#[test]
fn snapshot_and_later_entries() {
    let temp = TempDir::new().unwrap();
    {
        let (mut storage, _) = open(temp.path(), 1 << 20);
        append_sync(&mut storage, Some(hard_state(2, 1, 10)), &run(1, 10, 2));
        // A snapshot that matches the log keeps the entries after it.
        storage.save_snapshot(&snapshot(5, 2)).unwrap();
        assert_eq!((storage.first_index(), storage.last_index()), (6, 10));
        append_sync(&mut storage, None, &run(11, 20, 2));
        storage.save_snapshot(&snapshot(12, 2)).unwrap();
        assert_eq!(files_with_prefix(temp.path(), "snap-").len(), 1);
    }
    let (mut storage, restored) = open(temp.path(), 1 << 20);
    assert_eq!(restored.snapshot, Some(snapshot(12, 2)));
    assert_eq!(restored.entries, run(13, 20, 2));
    assert_eq!((storage.first_index(), storage.last_index()), (13, 20));
    // An older snapshot is refused; the same one again is a no-op.
    let stale = storage.save_snapshot(&snapshot(11, 2)).unwrap_err();
    assert!(
        matches!(stale, StorageError::StaleSnapshot { .. }),
        "{stale}"
    );
    storage.save_snapshot(&snapshot(12, 2)).unwrap();
}

#[test]
fn conflicting_snapshot_replaces_the_log() {
    let temp = TempDir::new().unwrap();
    {
        let (mut storage, _) = open(temp.path(), 1 << 20);
        append_sync(&mut storage, Some(hard_state(1, 1, 2)), &run(1, 10, 1));
        // From a leader of term 3: entry 8 has term 2 there, so the stored
        // entries 9 and 10 are from another history and must go.
        append_sync(&mut storage, Some(hard_state(3, 0, 2)), &[]);
        storage.save_snapshot(&snapshot(8, 2)).unwrap();
        assert_eq!(storage.last_index(), 8);
        append_sync(&mut storage, None, &run(9, 9, 3));
    }
    {
        let (mut storage, restored) = open(temp.path(), 1 << 20);
        assert_eq!(restored.snapshot, Some(snapshot(8, 2)));
        assert_eq!(restored.entries, run(9, 9, 3));
        // A snapshot beyond the end of the log.
        storage.save_snapshot(&snapshot(15, 3)).unwrap();
        assert_eq!((storage.first_index(), storage.last_index()), (16, 15));
        append_sync(&mut storage, None, &run(16, 18, 3));
    }
    let (_storage, restored) = open(temp.path(), 1 << 20);
    assert_eq!(restored.snapshot, Some(snapshot(15, 3)));
    assert_eq!(restored.entries, run(16, 18, 3));
    assert_eq!(restored.hard_state, hard_state(3, 0, 2));
}

#[test]
fn crash_between_snapshot_file_and_log_reset_is_repaired() {
    // The state after a crash right after save_snapshot renamed the snapshot
    // file into place but before it logged the reset: the log still has
    // entry 8 of term 1, the snapshot says term 2.
    let temp = TempDir::new().unwrap();
    let donor = TempDir::new().unwrap();
    {
        let (mut storage, _) = open(donor.path(), 1 << 20);
        append_sync(&mut storage, Some(hard_state(2, 0, 0)), &[]);
        storage.save_snapshot(&snapshot(8, 2)).unwrap();
    }
    {
        let (mut storage, _) = open(temp.path(), 1 << 20);
        append_sync(&mut storage, Some(hard_state(2, 0, 0)), &run(1, 10, 1));
    }
    for path in files_with_prefix(donor.path(), "snap-") {
        fs::copy(&path, temp.path().join(path.file_name().unwrap())).unwrap();
    }
    {
        let (mut storage, restored) = open(temp.path(), 1 << 20);
        assert_eq!(restored.snapshot, Some(snapshot(8, 2)));
        assert!(restored.entries.is_empty(), "{:?}", restored.entries);
        append_sync(&mut storage, None, &run(9, 11, 2));
    }
    // The entries appended after the repair survive the next open.
    let (_storage, restored) = open(temp.path(), 1 << 20);
    assert_eq!(restored.entries, run(9, 11, 2));
}

#[test]
fn segment_rollover_with_small_segments() {
    let temp = TempDir::new().unwrap();
    let mut rng = SplitMix64::new(7);
    let mut expected = Vec::new();
    {
        let (mut storage, _) = open(temp.path(), 512);
        append_sync(&mut storage, Some(hard_state(1, 1, 0)), &[]);
        let mut next = 1;
        while next <= 500 {
            let count = rng.range(1, 8);
            let batch: Vec<Entry> = (next..next + count)
                .map(|index| Entry {
                    kind: Default::default(),
                    index,
                    term: 1,
                    data: vec![index as u8; rng.range(0, 100) as usize],
                })
                .collect();
            append_sync(&mut storage, Some(hard_state(1, 1, next - 1)), &batch);
            expected.extend(batch);
            next += count;
        }
        let files = segments(temp.path());
        assert!(files.len() > 50, "only {} segments", files.len());
        let on_disk: u64 = files.iter().map(|p| fs::metadata(p).unwrap().len()).sum();
        assert_eq!(storage.size_bytes(), on_disk);
    }
    let (storage, restored) = open(temp.path(), 512);
    assert_eq!(restored.entries, expected);
    assert_eq!(storage.last_index(), expected.last().unwrap().index);
}

#[test]
fn size_bytes_shrinks_after_a_snapshot() {
    let temp = TempDir::new().unwrap();
    let (mut storage, _) = open(temp.path(), 4096);
    append_sync(&mut storage, Some(hard_state(1, 1, 0)), &[]);
    for index in 1..=1000 {
        append_sync(&mut storage, None, &[entry(index, 1)]);
    }
    let before = storage.size_bytes();
    storage.save_snapshot(&snapshot(1000, 1)).unwrap();
    let after = storage.size_bytes();
    assert!(after * 20 < before, "{before} bytes before, {after} after");
    let on_disk: u64 = segments(temp.path())
        .iter()
        .chain(files_with_prefix(temp.path(), "snap-").iter())
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(after, on_disk);
}

/// Writes 20 entries, then one more batch of 3 as a single record at the end
/// of the last segment; returns that segment and where the record starts.
fn write_then_last_record(dir: &Path) -> (PathBuf, u64, u64) {
    let (mut storage, _) = open(dir, 1 << 20);
    append_sync(&mut storage, Some(hard_state(2, 1, 15)), &[]);
    for first in (1..=20).step_by(5) {
        append_sync(&mut storage, None, &run(first, first + 4, 2));
    }
    let last = segments(dir).pop().unwrap();
    let start = fs::metadata(&last).unwrap().len();
    append_sync(&mut storage, None, &run(21, 23, 2));
    let end = fs::metadata(&last).unwrap().len();
    (last, start, end)
}

#[test]
fn torn_tail_is_cut_off() {
    let pristine = TempDir::new().unwrap();
    let (last, start, end) = write_then_last_record(pristine.path());
    let last_name = last.file_name().unwrap().to_owned();
    let mut rng = SplitMix64::new(0x5eed);
    for trial in 0..60 {
        let temp = TempDir::new().unwrap();
        copy_dir(pristine.path(), temp.path());
        let segment = temp.path().join(&last_name);
        let offset = rng.range(start, end);
        let truncated = trial % 2 == 0;
        if truncated {
            fs::OpenOptions::new()
                .write(true)
                .open(&segment)
                .unwrap()
                .set_len(offset)
                .unwrap();
        } else {
            flip_byte(&segment, offset);
        }
        let (_storage, restored) = open(temp.path(), 1 << 20);
        let context = format!("trial {trial}: truncated={truncated} at offset {offset}");
        assert_eq!(restored.entries, run(1, 20, 2), "{context}");
        assert_eq!(restored.hard_state, hard_state(2, 1, 15), "{context}");
        assert_eq!(fs::metadata(&segment).unwrap().len(), start, "{context}");
    }
    // The intact copy still has all 23.
    let (_storage, restored) = open(pristine.path(), 1 << 20);
    assert_eq!(restored.entries, run(1, 23, 2));
}

#[test]
fn flipped_byte_in_an_earlier_record_is_an_error() {
    let temp = TempDir::new().unwrap();
    let (last, start, _) = write_then_last_record(temp.path());
    // Inside the last segment, but followed by an intact record.
    flip_byte(&last, start - 10);
    let message = assert_open_fails_untouched(temp.path(), 1 << 20, &[&file_name(&last)]);
    assert!(message.contains("intact record follows"), "{message}");

    // In a segment that is not the last one.
    let temp = TempDir::new().unwrap();
    {
        let (mut storage, _) = open(temp.path(), 200);
        append_sync(&mut storage, Some(hard_state(1, 1, 0)), &[]);
        for index in 1..=40 {
            append_sync(&mut storage, None, &[entry(index, 1)]);
        }
    }
    let files = segments(temp.path());
    assert!(files.len() > 4);
    let victim = &files[2];
    let victim_bytes = fs::metadata(victim).unwrap().len();
    flip_byte(victim, victim_bytes - 3);
    assert_open_fails_untouched(temp.path(), 200, &[&file_name(victim), "corrupt"]);
}

#[test]
fn missing_segments_are_errors() {
    let temp = TempDir::new().unwrap();
    {
        let (mut storage, _) = open(temp.path(), 200);
        append_sync(&mut storage, Some(hard_state(1, 1, 0)), &[]);
        for index in 1..=40 {
            append_sync(&mut storage, None, &[entry(index, 1)]);
        }
    }
    let files = segments(temp.path());
    assert!(files.len() > 4);
    // A segment in the middle.
    let middle = TempDir::new().unwrap();
    copy_dir(temp.path(), middle.path());
    let victim = middle
        .path()
        .join(files[files.len() / 2].file_name().unwrap());
    fs::remove_file(&victim).unwrap();
    assert_open_fails_untouched(middle.path(), 200, &["missing", &file_name(&victim)]);
    // The first segments, with no snapshot to cover their entries.
    let head = TempDir::new().unwrap();
    copy_dir(temp.path(), head.path());
    fs::remove_file(head.path().join(files[0].file_name().unwrap())).unwrap();
    fs::remove_file(head.path().join(files[1].file_name().unwrap())).unwrap();
    assert_open_fails_untouched(head.path(), 200, &["are missing"]);
}

#[test]
fn second_open_of_a_locked_directory_fails() {
    let temp = TempDir::new().unwrap();
    let (storage, _) = open(temp.path(), 1 << 20);
    let error = open_err(temp.path(), 1 << 20);
    assert!(matches!(error, StorageError::Locked { .. }));
    assert_eq!(
        error.to_string(),
        format!(
            "data directory {} is locked by another process",
            temp.path().display()
        )
    );
    drop(storage);
    let (_storage, _) = open(temp.path(), 1 << 20);
}

#[test]
fn corrupt_newest_snapshot_is_an_error() {
    let temp = TempDir::new().unwrap();
    {
        let (mut storage, _) = open(temp.path(), 1 << 20);
        append_sync(&mut storage, Some(hard_state(1, 1, 10)), &run(1, 10, 1));
        storage.save_snapshot(&snapshot(10, 1)).unwrap();
    }
    let snapshot_file = files_with_prefix(temp.path(), "snap-").pop().unwrap();
    let length = fs::metadata(&snapshot_file).unwrap().len();
    // A flipped data byte.
    flip_byte(&snapshot_file, length - 2);
    assert_open_fails_untouched(
        temp.path(),
        1 << 20,
        &[&file_name(&snapshot_file), "checksum"],
    );
    flip_byte(&snapshot_file, length - 2);
    // A cut file.
    fs::OpenOptions::new()
        .write(true)
        .open(&snapshot_file)
        .unwrap()
        .set_len(length - 5)
        .unwrap();
    assert_open_fails_untouched(temp.path(), 1 << 20, &[&file_name(&snapshot_file)]);
}

/// What a correct storage must return: the model is updated by the same
/// operations and compared with every reopen.
#[derive(Default)]
struct Model {
    hard_state: HardState,
    snapshot: Option<Snapshot>,
    entries: Vec<Entry>,
}

impl Model {
    fn last_index(&self) -> u64 {
        self.entries
            .last()
            .map(|e| e.index)
            .unwrap_or_else(|| self.snapshot.as_ref().map_or(0, |s| s.meta.index))
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
}

#[test]
fn random_operations_match_a_model() {
    for seed in 1..=8u64 {
        let temp = TempDir::new().unwrap();
        let mut rng = SplitMix64::new(seed);
        let segment_bytes = rng.range(150, 2000);
        let mut model = Model::default();
        let (mut storage, _) = open(temp.path(), segment_bytes);
        for step in 0..300 {
            let context = format!("seed {seed} step {step}");
            match rng.range(0, 20) {
                0..=13 => {
                    // Append, sometimes overwriting a suffix, sometimes in a new term.
                    let mut hard_state = model.hard_state;
                    if rng.chance(1, 5) {
                        hard_state.term += 1;
                        hard_state.vote = rng.range(0, 4);
                    }
                    let first_allowed = storage.first_index();
                    let last = model.last_index();
                    let first = if last >= first_allowed && rng.chance(1, 4) {
                        rng.range(first_allowed, last + 1)
                    } else {
                        last + 1
                    };
                    let term_before = model.term_at(first - 1).unwrap_or(0);
                    let term = rng.range(term_before.max(1), hard_state.term.max(1) + 1);
                    if term > hard_state.term {
                        hard_state.term = term;
                    }
                    let batch: Vec<Entry> = (first..first + rng.range(0, 6))
                        .map(|index| Entry {
                            kind: Default::default(),
                            index,
                            term,
                            data: vec![step as u8; rng.range(0, 40) as usize],
                        })
                        .collect();
                    append_sync(&mut storage, Some(hard_state), &batch);
                    model.hard_state = hard_state;
                    if !batch.is_empty() {
                        model.entries.retain(|e| e.index < first);
                        model.entries.extend(batch);
                    }
                }
                14..=16 => {
                    let last = model.last_index();
                    let snapshot_index = model.snapshot.as_ref().map_or(0, |s| s.meta.index);
                    if last <= snapshot_index {
                        continue;
                    }
                    let index = rng.range(snapshot_index + 1, last + 1);
                    let term = model.term_at(index).unwrap();
                    let snap = snapshot(index, term);
                    storage.save_snapshot(&snap).expect(&context);
                    model.entries.retain(|e| e.index > index);
                    model.snapshot = Some(snap);
                }
                17 => {
                    // A snapshot from a leader that does not match the log.
                    let index = model.last_index() + rng.range(1, 5);
                    let term = model.hard_state.term.max(1);
                    let snap = snapshot(index, term);
                    storage.save_snapshot(&snap).expect(&context);
                    model.entries.clear();
                    model.snapshot = Some(snap);
                }
                _ => {
                    drop(storage);
                    let (reopened, restored) = open(temp.path(), segment_bytes);
                    storage = reopened;
                    assert_eq!(restored.hard_state, model.hard_state, "{context}");
                    assert_eq!(restored.snapshot, model.snapshot, "{context}");
                    assert_eq!(restored.entries, model.entries, "{context}");
                }
            }
            assert_eq!(storage.last_index(), model.last_index(), "{context}");
        }
    }
}

/// The testing hook's `fail` behaves as a real failed fsync: the sync fails,
/// the storage refuses all further work, and what was synced before is still
/// there on the next open.
#[test]
fn injected_fsync_failure_stops_the_storage() {
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("data");
    let fault_path = dir.path().join("fault");
    let faulty = StorageOptions {
        fault_file: Some(FaultFile::new(&fault_path)),
        ..options(1 << 20)
    };
    let (mut storage, _) = DiskStorage::open(&data, faulty).unwrap();
    append_sync(&mut storage, Some(hard_state(1, 1, 0)), &run(1, 3, 1));
    fs::write(&fault_path, "fail").unwrap();
    storage.append(None, &run(4, 5, 1)).unwrap();
    let error = storage.sync().unwrap_err();
    assert!(
        error.to_string().contains("injected fsync failure"),
        "{error}"
    );
    fs::write(&fault_path, "").unwrap();
    let later = storage.sync().unwrap_err();
    assert!(matches!(later, StorageError::Stopped { .. }), "{later}");
    assert!(storage.append(None, &run(4, 5, 1)).is_err());
    drop(storage);
    let (storage, restored) = open(&data, 1 << 20);
    assert!(storage.last_index() >= 3);
    assert_eq!(restored.hard_state, hard_state(1, 1, 0));
}

/// The last segment as written with preallocation: `(path, start, end)` of its last record
/// (a batch of 3 after 20 entries), the zeroes preallocated after it.
fn preallocated_last_record(dir: &Path) -> (PathBuf, u64, u64) {
    let (mut storage, _) = DiskStorage::open(dir, preallocating(64 << 20)).unwrap();
    append_sync(&mut storage, Some(hard_state(2, 1, 15)), &[]);
    for first in (1..=20).step_by(5) {
        append_sync(&mut storage, None, &run(first, first + 4, 2));
    }
    // One segment (the directory is fresh), so its records end at `size_bytes`.
    let start = storage.size_bytes();
    append_sync(&mut storage, None, &run(21, 23, 2));
    let end = storage.size_bytes();
    let last = segments(dir).pop().unwrap();
    let file_bytes = fs::metadata(&last).unwrap().len();
    assert!(
        file_bytes > end && file_bytes >= 1 << 20,
        "{file_bytes} bytes on disk for {end} bytes of records: not preallocated"
    );
    (last, start, end)
}

/// The active segment is preallocated (zeroes written ahead of its records); a reopen
/// returns every entry and cuts the zeroes, so that the segment, closed now, ends with its
/// last record.
#[test]
fn preallocated_segment_reopens_whole_and_is_cut_to_its_records() {
    let temp = TempDir::new().unwrap();
    let (last, _, end) = preallocated_last_record(temp.path());
    let (_storage, restored) = DiskStorage::open(temp.path(), preallocating(64 << 20)).unwrap();
    assert_eq!(restored.entries, run(1, 23, 2));
    assert_eq!(restored.hard_state, hard_state(2, 1, 15));
    assert_eq!(fs::metadata(&last).unwrap().len(), end);
}

/// A crash while a batch overwrote preallocated zeroes: the batch torn anywhere (a flipped
/// byte, or a prefix of it with zeroes after) is cut like a torn tail; an intact record after
/// zeroes where an earlier record was (out-of-order writeback) is corruption, as without
/// preallocation.
#[test]
fn preallocated_torn_tail_is_cut_and_a_hole_before_an_intact_record_is_refused() {
    let pristine = TempDir::new().unwrap();
    let (last, start, end) = preallocated_last_record(pristine.path());
    let name = last.file_name().unwrap().to_owned();
    let mut rng = SplitMix64::new(0xfa11);
    for trial in 0..30 {
        let temp = TempDir::new().unwrap();
        copy_dir(pristine.path(), temp.path());
        let segment = temp.path().join(&name);
        let offset = rng.range(start, end);
        let zeroed = trial % 2 == 0;
        if zeroed {
            let mut bytes = fs::read(&segment).unwrap();
            bytes[offset as usize..end as usize].fill(0);
            fs::write(&segment, bytes).unwrap();
        } else {
            flip_byte(&segment, offset);
        }
        let (_storage, restored) = DiskStorage::open(temp.path(), preallocating(64 << 20)).unwrap();
        let context = format!("trial {trial}: zeroed={zeroed} from offset {offset}");
        assert_eq!(restored.entries, run(1, 20, 2), "{context}");
        assert_eq!(fs::metadata(&segment).unwrap().len(), start, "{context}");
    }
    let temp = TempDir::new().unwrap();
    copy_dir(pristine.path(), temp.path());
    let segment = temp.path().join(&name);
    let mut bytes = fs::read(&segment).unwrap();
    bytes[start as usize - 10..start as usize].fill(0);
    fs::write(&segment, bytes).unwrap();
    let before = dir_contents(temp.path());
    let error = DiskStorage::open(temp.path(), preallocating(64 << 20))
        .expect_err("a hole before an intact record opened");
    assert!(
        error.to_string().contains("intact record follows"),
        "{error}"
    );
    assert_eq!(
        dir_contents(temp.path()),
        before,
        "a failed open changed files"
    );
}

/// Closing a preallocated segment (a snapshot starts a new one) cuts its zeroes before the
/// next segment is started, so only the last segment ever ends in zeroes: the closed segment
/// reopens whole, and zeroes after its records are corruption.
#[test]
fn preallocated_segments_are_cut_when_closed() {
    let temp = TempDir::new().unwrap();
    let segment_bytes = 64 << 20;
    {
        let (mut storage, _) =
            DiskStorage::open(temp.path(), preallocating(segment_bytes)).unwrap();
        append_sync(&mut storage, Some(hard_state(1, 1, 0)), &[]);
        append_sync(&mut storage, None, &run(1, 100, 1));
        storage.save_snapshot(&snapshot(50, 1)).unwrap();
        append_sync(&mut storage, None, &run(101, 200, 1));
        storage.save_snapshot(&snapshot(150, 1)).unwrap();
        append_sync(&mut storage, None, &run(201, 210, 1));
    }
    let files = segments(temp.path());
    assert_eq!(files.len(), 2, "{files:?}");
    let closed = &files[0];
    assert!(
        fs::metadata(closed).unwrap().len() < 1 << 20,
        "the closed segment kept its preallocated zeroes"
    );
    let (storage, restored) = DiskStorage::open(temp.path(), preallocating(segment_bytes)).unwrap();
    assert_eq!(restored.entries, run(151, 210, 1));
    drop(storage);
    let mut bytes = fs::read(closed).unwrap();
    bytes.extend([0u8; 4096]);
    fs::write(closed, bytes).unwrap();
    let error = DiskStorage::open(temp.path(), preallocating(segment_bytes))
        .expect_err("zeroes after a closed segment's records opened");
    let message = error.to_string();
    assert!(
        message.contains(&file_name(closed)) && message.contains("not the last"),
        "{message}"
    );
}
