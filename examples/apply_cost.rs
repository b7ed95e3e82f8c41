//! The apply thread's cost per put with the storage engine, without a cluster: applies
//! `--entries` puts (256-byte values over 10,000 keys, from `--clients` clients, as the
//! standard put scenarios write them) to a state machine on a fresh engine, committing every
//! `--per-commit` entries, and prints the rate. Meant to compare variants of the apply path
//! by instruction count, which the machine's noise does not change:
//!
//! ```text
//! cargo build --release --example apply_cost
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//!     target/release/examples/apply_cost --entries 20000 --per-commit 8
//! callgrind_annotate /tmp/cg.out | head -30
//! ```

use kvstore_raft::kv::engine::Engine;
use kvstore_raft::kv::state_machine::{
    encode_command, make_command, KvOp, KvOptions, KvStateMachine,
};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

fn main() {
    let entries = arg("--entries", 20_000);
    let per_commit = arg("--per-commit", 8).max(1);
    let clients = arg("--clients", 64).max(1);
    let dir = std::env::temp_dir().join(format!("apply_cost-{}", std::process::id()));
    let engine = Engine::open(&dir, 64 << 20).expect("engine opens");
    let mut machine = KvStateMachine::open(engine, KvOptions::default()).expect("machine opens");
    let value = vec![b'v'; 256];
    let commands: Vec<Vec<u8>> = (0..entries)
        .map(|i| {
            let client = i % clients + 1;
            let key = format!("key-{:05}", (i * 7919) % 10_000).into_bytes();
            let op = KvOp::Put {
                key,
                value: value.clone(),
            };
            encode_command(&make_command(client, i / clients + 1, 1_000 + i, op))
        })
        .collect();
    let started = std::time::Instant::now();
    for (i, data) in commands.iter().enumerate() {
        machine.apply_checked(i as u64 + 1, data).expect("applies");
        if (i as u64 + 1).is_multiple_of(per_commit) {
            machine.commit_batch(false).expect("commits");
        }
    }
    machine.commit_batch(false).expect("commits");
    let elapsed = started.elapsed();
    println!(
        "{entries} puts, a commit every {per_commit}: {:.0} puts/s",
        entries as f64 / elapsed.as_secs_f64()
    );
    drop(machine);
    std::fs::remove_dir_all(&dir).expect("the engine directory is removed");
}
