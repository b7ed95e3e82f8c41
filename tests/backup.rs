//! Backup and restore (issue 14, item 6): `clerk snapshot save` under load, then
//! `kvserver restore` of every node of a new cluster (other ports, other
//! directories) from that one file; damaged, truncated and wrong-version files
//! refused with one line, nothing written.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestCluster;
use kvstore_raft::kv::backup;

const CACHE_BYTES: u64 = 8 << 20;

/// About 4 KiB, so that the backup spans several chunks (1 MiB each).
fn value_of(i: u64) -> String {
    format!("value-{i}-{}", "x".repeat(4000 + (i % 50) as usize))
}

/// Writes `bytes` to a new file beside `path` named `name`.
fn variant(path: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let out = path.with_file_name(name);
    std::fs::write(&out, bytes).unwrap();
    out
}

#[test]
fn a_backup_under_load_restores_a_whole_new_cluster() {
    let source = TestCluster::start(3, r#""snapshot_threshold_bytes": 20000"#);
    source.wait_leader(Duration::from_secs(10));
    // One writer puts key-0, key-1, ... in order: `acked` counts those answered OK.
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop) = (Arc::clone(&acked), Arc::clone(&stop));
        let mut clerk = source.clerk(10_000);
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) && i < 50_000 {
                clerk.put(format!("key-{i}"), value_of(i)).unwrap();
                i += 1;
                acked.store(i, Ordering::SeqCst);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.load(Ordering::SeqCst) < 300 {
        assert!(Instant::now() < deadline, "the writer made no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cluster.backup");
    let acked_before_save = acked.load(Ordering::SeqCst);
    let clerk = source.clerk(10_000);
    let info = clerk
        .snapshot_save(None, &source.config.cluster_id, &file)
        .unwrap();
    let acked_after_save = acked.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    eprintln!(
        "backup at index {} with {} keys; {acked_before_save} puts acknowledged before the \
         save, {acked_after_save} when it ended",
        info.header.index, info.trailer.keys
    );
    assert!(info.trailer.keys >= acked_before_save, "{info:?}");
    assert!(info.trailer.chunks >= 2, "streamed in chunks: {info:?}");
    assert_eq!(backup::inspect(&file).unwrap(), info);
    assert!(!file.with_extension("backup.partial").exists());

    // Damaged copies are refused with one line, and nothing is written.
    let bytes = std::fs::read(&file).unwrap();
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x01;
    let mut old_version = bytes.clone();
    old_version[8] = 9;
    let cases = [
        (variant(&file, "flipped", &flipped), "checksum mismatch"),
        (
            variant(&file, "truncated", &bytes[..bytes.len() * 2 / 3]),
            "truncated: no end marker",
        ),
        (
            variant(&file, "version", &old_version),
            "unsupported backup version 9 (this build reads 1)",
        ),
        (variant(&file, "garbage", b"hello"), "bad magic"),
    ];
    for (n, (damaged, expected)) in cases.iter().enumerate() {
        let target = dir.path().join(format!("restore-{n}"));
        let error = backup::restore(damaged, &target, CACHE_BYTES).unwrap_err();
        assert!(error.contains(expected), "{error} (expected {expected:?})");
        assert!(!error.contains('\n'), "one line: {error}");
        assert!(!target.exists(), "{} was written", target.display());
    }

    // A new cluster (other ports, other directories), every node seeded from the file.
    let restored = TestCluster::start_seeded(3, "", |config, id| {
        let data_dir = config.node_data_dir(id);
        backup::restore(&file, &data_dir, CACHE_BYTES).unwrap();
        // A second restore into the same (now full) directory is refused.
        let again = backup::restore(&file, &data_dir, CACHE_BYTES).unwrap_err();
        assert!(again.contains("is not empty"), "{again}");
    });
    restored.wait_leader(Duration::from_secs(10));
    for id in 1..=3 {
        let status = restored.status(id).unwrap();
        assert!(status.applied >= info.header.index, "node {id}: {status:?}");
    }
    let mut clerk = restored.clerk(10_000);
    for i in 0..acked_before_save {
        let value = clerk.get(format!("key-{i}")).unwrap();
        assert_eq!(
            value.as_deref(),
            Some(value_of(i).as_bytes()),
            "key-{i}, acknowledged before the save"
        );
    }
    // Nothing past the backup's index: the first key never acknowledged is absent.
    assert_eq!(
        clerk.get(format!("key-{}", info.trailer.keys)).unwrap(),
        None
    );
    // The new cluster takes writes.
    clerk.put("after-restore", "yes").unwrap();
    assert_eq!(
        clerk.get("after-restore").unwrap().as_deref(),
        Some(&b"yes"[..])
    );
}

/// `clerk snapshot status` prints what a backup holds, and refuses a damaged one
/// with one line and exit 3.
#[test]
fn clerk_snapshot_status_describes_a_backup_and_refuses_a_damaged_one() {
    let cluster = TestCluster::start(3, "");
    cluster.wait_leader(Duration::from_secs(10));
    let mut clerk = cluster.clerk(10_000);
    for i in 0..20 {
        clerk.put(format!("k{i}"), "v").unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("b");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_clerk"))
        .arg("--config")
        .arg(&cluster.config_path)
        .args(["snapshot", "save"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clerk"))
        .args(["snapshot", "status"])
        .arg(&file)
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["trailer"]["keys"], 20);
    assert_eq!(json["header"]["cluster_id"], "default");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 20;
    bytes[last] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clerk"))
        .args(["snapshot", "status"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("checksum mismatch"), "{stderr}");
}
