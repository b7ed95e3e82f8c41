//! The cost of each step of a streamed snapshot, without a cluster or a network: fills an
//! engine with `--keys` keys as `loadgen --preload` writes them (`key%08d`, 256-byte values),
//! then streams a view of it into a fresh engine beside it, one chunk at a time on one thread,
//! and prints the time spent reading the view, compressing, decompressing and building, with
//! the stream's raw and compressed sizes. Shows which end bounds a transfer's speed when the
//! rate limit does not:
//!
//! ```text
//! cargo build --release --example stream_cost
//! target/release/examples/stream_cost --keys 1000000 [--dir DIR] [--chunk-bytes N]
//! ```
//!
//! With `--dir`, the filled engine is kept in `DIR/source` and reused by the next run.

use std::time::{Duration, Instant};

use kvstore_raft::kv::engine::{Engine, EngineBatch, EngineMeta};
use kvstore_raft::kv::snapshot_stream::{
    ChunkCodec, SnapshotBuilder, SnapshotReader, DEFAULT_CHUNK_BYTES,
};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn number(name: &str, default: u64) -> u64 {
    arg(name).map_or(default, |v| v.parse().expect("a number"))
}

const CACHE_BYTES: u64 = 64 << 20;

fn fill(engine: &Engine, keys: u64) {
    let started = Instant::now();
    let mut value = vec![b'x'; 256];
    let mut batch = EngineBatch::default();
    for i in 0..keys {
        // As loadgen: a prefix unique to the write, the rest 'x'.
        let prefix = format!("v1234abcd-{}-{}-", i % 512, i / 512);
        value[..prefix.len()].copy_from_slice(prefix.as_bytes());
        batch
            .data
            .insert(format!("key{i:08}").into_bytes(), Some(value.clone()));
        if batch.data.len() == 8192 || i + 1 == keys {
            batch.meta = EngineMeta {
                applied_index: i + 1,
                clock_ms: 1,
            };
            engine.commit(&batch, false).expect("commit");
            batch.data.clear();
        }
    }
    engine.checkpoint().expect("checkpoint");
    eprintln!(
        "filled {keys} keys in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn main() {
    let keys = number("--keys", 1_000_000);
    let chunk_bytes = number("--chunk-bytes", DEFAULT_CHUNK_BYTES as u64) as usize;
    let codec = match arg("--codec").as_deref() {
        None | Some("lz4") => ChunkCodec::Lz4,
        Some("none") => ChunkCodec::None,
        Some(other) => panic!("unknown codec {other}"),
    };
    let (dir, _temp) = match arg("--dir") {
        Some(dir) => (std::path::PathBuf::from(dir), None),
        None => {
            let temp = std::env::temp_dir().join(format!("stream_cost-{}", std::process::id()));
            (temp.clone(), Some(temp))
        }
    };
    let source_dir = dir.join("source");
    let existed = source_dir.exists();
    let source = Engine::open(&source_dir, CACHE_BYTES).expect("source opens");
    if !existed {
        fill(&source, keys);
    }
    let live = dir.join("engine");
    let mut reader = SnapshotReader::new(source.view(), chunk_bytes)
        .expect("reader")
        .with_codec(codec);
    let mut builder = SnapshotBuilder::new(&live, CACHE_BYTES).expect("builder");
    let (mut read, mut build) = (Duration::ZERO, Duration::ZERO);
    let (mut wire, mut chunks) = (0u64, 0u64);
    let started = Instant::now();
    loop {
        let t = Instant::now();
        let Some(chunk) = reader.next_chunk().expect("a chunk") else {
            break;
        };
        read += t.elapsed();
        wire += chunk.len() as u64;
        chunks += 1;
        let t = Instant::now();
        builder.push(&chunk).expect("push");
        build += t.elapsed();
    }
    let t = Instant::now();
    let verified = builder.finish().expect("finish");
    let finish = t.elapsed();
    let total = started.elapsed();
    let summary = verified.summary();
    println!(
        "{} keys, {chunks} chunks, stream {:.1} MB, on the wire {:.1} MB ({codec:?}); \
         read+encode {:.2} s, decode+build {:.2} s, finish {:.2} s, total {:.2} s ({:.0} keys/s)",
        summary.keys,
        summary.bytes as f64 / 1e6,
        wire as f64 / 1e6,
        read.as_secs_f64(),
        build.as_secs_f64(),
        finish.as_secs_f64(),
        total.as_secs_f64(),
        summary.keys as f64 / total.as_secs_f64()
    );
    drop(verified);
    let _ = std::fs::remove_dir_all(kvstore_raft::kv::engine::incoming_dir(&live));
    if let Some(temp) = _temp {
        drop(source);
        let _ = std::fs::remove_dir_all(temp);
    }
}
