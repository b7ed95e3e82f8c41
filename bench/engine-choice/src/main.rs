//! Engine-choice microbenchmark for kvstore-raft's applied state (issue 11).
//!
//! Models the apply thread: batches of `BATCH` puts of 256-byte values at random keys of a
//! table preloaded with `KEYS` keys, one atomic commit per batch with relaxed fsync (the Raft
//! WAL holds the entries), a durable checkpoint every `CHECKPOINT_BATCHES` batches; then point
//! reads; then a consistent read view iterated from start to end while the writes go on. The
//! engines get the same cache (`CACHE_MIB`). Prints one line per phase and the process's RSS.
//!
//!     cargo run --release -- redb|fjall DIR [KEYS] [SECONDS]

use std::time::{Duration, Instant};

const BATCH: usize = 256;
const VALUE_BYTES: usize = 256;
const CACHE_MIB: u64 = 64;
const CHECKPOINT_BATCHES: u64 = 200;

fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
}

/// xorshift64: reproducible random keys without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn key(i: u64) -> [u8; 16] {
    let mut k = *b"key-000000000000";
    let digits = format!("{:012}", i);
    k[4..].copy_from_slice(digits.as_bytes());
    k
}

trait Engine: Send + Sync {
    fn put_batch(&self, items: &[([u8; 16], Vec<u8>)], durable: bool);
    fn get(&self, k: &[u8]) -> bool;
    /// Iterates a point-in-time view, calling `during` every 10,000 keys; returns keys seen.
    fn scan_view(&self, during: &mut dyn FnMut()) -> u64;
    fn disk_bytes(&self) -> u64;
}

mod redb_engine {
    use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
    pub const DATA: TableDefinition<&[u8], &[u8]> = TableDefinition::new("data");
    pub struct E(pub Database, pub std::path::PathBuf);
    impl super::Engine for E {
        fn put_batch(&self, items: &[([u8; 16], Vec<u8>)], durable: bool) {
            let mut tx = self.0.begin_write().unwrap();
            tx.set_durability(if durable { Durability::Immediate } else { Durability::None })
                .unwrap();
            {
                let mut t = tx.open_table(DATA).unwrap();
                for (k, v) in items {
                    t.insert(&k[..], &v[..]).unwrap();
                }
            }
            tx.commit().unwrap();
        }
        fn get(&self, k: &[u8]) -> bool {
            let tx = self.0.begin_read().unwrap();
            let t = tx.open_table(DATA).unwrap();
            let found = t.get(k).unwrap().is_some();
            found
        }
        fn scan_view(&self, during: &mut dyn FnMut()) -> u64 {
            let tx = self.0.begin_read().unwrap();
            let t = tx.open_table(DATA).unwrap();
            let mut n = 0;
            for r in t.iter().unwrap() {
                let (_k, v) = r.unwrap();
                assert_eq!(v.value().len(), super::VALUE_BYTES);
                n += 1;
                if n % 10_000 == 0 {
                    during();
                }
            }
            n
        }
        fn disk_bytes(&self) -> u64 {
            std::fs::metadata(&self.1).unwrap().len()
        }
    }
}

mod fjall_engine {
    use fjall::{Database, Keyspace, PersistMode, Readable};
    pub struct E(pub Database, pub Keyspace, pub std::path::PathBuf);
    impl super::Engine for E {
        fn put_batch(&self, items: &[([u8; 16], Vec<u8>)], durable: bool) {
            let mut b = self.0.batch().durability(None);
            for (k, v) in items {
                b.insert(&self.1, &k[..], &v[..]);
            }
            b.commit().unwrap();
            if durable {
                self.0.persist(PersistMode::SyncAll).unwrap();
            }
        }
        fn get(&self, k: &[u8]) -> bool {
            self.1.get(k).unwrap().is_some()
        }
        fn scan_view(&self, during: &mut dyn FnMut()) -> u64 {
            let snap = self.0.snapshot();
            let mut n = 0;
            for g in snap.iter(&self.1) {
                let (_k, v) = g.into_inner().unwrap();
                assert_eq!(v.len(), super::VALUE_BYTES);
                n += 1;
                if n % 10_000 == 0 {
                    during();
                }
            }
            n
        }
        fn disk_bytes(&self) -> u64 {
            fn walk(p: &std::path::Path) -> u64 {
                let mut s = 0;
                for e in std::fs::read_dir(p).unwrap() {
                    let e = e.unwrap();
                    let m = e.metadata().unwrap();
                    s += if m.is_dir() { walk(&e.path()) } else { m.len() };
                }
                s
            }
            walk(&self.2)
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let which = args.get(1).expect("usage: engine-choice redb|fjall DIR [KEYS] [SECONDS]");
    let dir = std::path::PathBuf::from(args.get(2).expect("DIR"));
    let keys: u64 = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(2_000_000);
    let seconds: u64 = args.get(4).map(|s| s.parse().unwrap()).unwrap_or(10);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let engine: Box<dyn Engine> = match which.as_str() {
        "redb" => {
            let path = dir.join("data.redb");
            let db = redb::Builder::new()
                .set_cache_size((CACHE_MIB << 20) as usize)
                .create(&path)
                .unwrap();
            Box::new(redb_engine::E(db, path))
        }
        "fjall" => {
            let db = fjall::Database::builder(&dir)
                .cache_size(CACHE_MIB << 20)
                .manual_journal_persist(true)
                .open()
                .unwrap();
            let ks = db.keyspace("data", fjall::KeyspaceCreateOptions::default).unwrap();
            Box::new(fjall_engine::E(db, ks, dir.clone()))
        }
        other => panic!("unknown engine {other}"),
    };
    let value = vec![7u8; VALUE_BYTES];

    // Preload in key order, large batches (what a snapshot install or a bulk load does).
    let t = Instant::now();
    let mut i = 0;
    while i < keys {
        let n = (keys - i).min(10_000);
        let items: Vec<_> = (i..i + n).map(|j| (key(j), value.clone())).collect();
        engine.put_batch(&items, i + n >= keys);
        i += n;
    }
    println!(
        "{which}: preload {keys} keys in order: {:.1} s, disk {} MiB, RSS {} MiB",
        t.elapsed().as_secs_f64(),
        engine.disk_bytes() >> 20,
        rss_mib()
    );

    // Random puts in batches, relaxed fsync, durable checkpoint every CHECKPOINT_BATCHES.
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let t = Instant::now();
    let mut batches = 0u64;
    let mut worst = Duration::ZERO;
    while t.elapsed() < Duration::from_secs(seconds) {
        let items: Vec<_> = (0..BATCH).map(|_| (key(rng.next() % keys), value.clone())).collect();
        let b = Instant::now();
        engine.put_batch(&items, batches % CHECKPOINT_BATCHES == CHECKPOINT_BATCHES - 1);
        worst = worst.max(b.elapsed());
        batches += 1;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{which}: random puts, batches of {BATCH}: {:.0} puts/s, slowest batch {:.1} ms, disk {} MiB, RSS {} MiB",
        (batches * BATCH as u64) as f64 / secs,
        worst.as_secs_f64() * 1e3,
        engine.disk_bytes() >> 20,
        rss_mib()
    );

    // Point reads at random keys.
    let t = Instant::now();
    let mut reads = 0u64;
    while t.elapsed() < Duration::from_secs(seconds / 2) {
        for _ in 0..1000 {
            assert!(engine.get(&key(rng.next() % keys)));
        }
        reads += 1000;
    }
    println!(
        "{which}: point reads: {:.0} gets/s, RSS {} MiB",
        reads as f64 / t.elapsed().as_secs_f64(),
        rss_mib()
    );

    // A consistent view iterated while a batch is written every 10,000 keys read.
    let t = Instant::now();
    let mut during_batches = 0u64;
    let seen = engine.scan_view(&mut || {
        let items: Vec<_> = (0..BATCH).map(|_| (key(rng.next() % keys), value.clone())).collect();
        engine.put_batch(&items, false);
        during_batches += 1;
    });
    assert_eq!(seen, keys, "the view saw every key exactly once");
    println!(
        "{which}: view of {seen} keys iterated with {during_batches} batches written meanwhile: {:.1} s, RSS {} MiB",
        t.elapsed().as_secs_f64(),
        rss_mib()
    );
}
