//! Concurrent clerks recording a history, for the KV service tests: each
//! client appends `x c j y` elements and reads and writes keys at random,
//! every operation logged with its call and return times (an operation that
//! timed out has an unknown outcome). The history then goes to the
//! linearizability checker, and the final values to the append-order check.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvstore_raft::check::{self, KvInput, KvOutput, Operation, Verdict};
use kvstore_raft::clerk::{Clerk, ClerkError};
use kvstore_raft::raft::SplitMix64;
use kvstore_raft::rpc::{RpcChannel, RpcError};
use parking_lot::Mutex;

/// What each client does, in percent; the rest of 100 are gets.
#[derive(Clone, Debug)]
pub struct Mix {
    pub append_percent: u64,
    pub put_percent: u64,
}

pub struct Workload {
    pub clients: usize,
    pub keys: Vec<String>,
    pub mix: Mix,
    /// How long the clients run.
    pub duration: Duration,
    /// At most this many operations per client, to keep histories checkable.
    pub max_ops_per_client: usize,
    pub seed: u64,
}

/// What a workload run recorded.
#[derive(Default)]
pub struct Recorded {
    pub history: Vec<Operation>,
    /// Acknowledged appends per key, in each client's order.
    pub acked_appends: HashMap<String, Vec<(u64, String)>>,
    pub ok_ops: usize,
    pub unknown_ops: usize,
}

/// Microseconds since `epoch`, the history's clock.
fn micros(epoch: Instant) -> u64 {
    epoch.elapsed().as_micros() as u64
}

/// Runs `workload` with one clerk per client from `make_clerk`, while the
/// caller's nemesis runs elsewhere; returns when every client has stopped.
/// Times in the history count from `epoch`, which several runs checked as
/// one history must share.
pub fn run(
    workload: &Workload,
    make_clerk: &(dyn Fn(usize) -> Clerk + Sync),
    epoch: Instant,
) -> Recorded {
    let recorded = Arc::new(Mutex::new(Recorded::default()));
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for client in 0..workload.clients {
            let recorded = Arc::clone(&recorded);
            let stop = &stop;
            scope.spawn(move || {
                let clerk = make_clerk(client);
                let ops = run_client(workload, client, clerk, epoch, stop);
                let mut recorded = recorded.lock();
                for (op, acked) in ops {
                    if let Some((key, element)) = acked {
                        recorded
                            .acked_appends
                            .entry(key)
                            .or_default()
                            .push((op.client_id, element));
                    }
                    if op.output.is_some() {
                        recorded.ok_ops += 1;
                    } else {
                        recorded.unknown_ops += 1;
                    }
                    recorded.history.push(op);
                }
            });
        }
        std::thread::sleep(workload.duration);
        stop.store(true, Ordering::SeqCst);
    });
    Arc::try_unwrap(recorded)
        .ok()
        .expect("all clients done")
        .into_inner()
}

type Logged = (Operation, Option<(String, String)>);

fn run_client(
    workload: &Workload,
    client: usize,
    mut clerk: Clerk,
    epoch: Instant,
    stop: &AtomicBool,
) -> Vec<Logged> {
    let mut rng =
        SplitMix64::new(workload.seed ^ (client as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    // The history's client, unique over rounds (the clerk's session id is
    // the cluster's, and only known after its first write).
    let client_id = kvstore_raft::clerk::random_client_id();
    let mut ops = Vec::new();
    let mut appends = 0u64;
    while !stop.load(Ordering::SeqCst) && ops.len() < workload.max_ops_per_client {
        let key = workload.keys[rng.range(0, workload.keys.len() as u64) as usize].clone();
        let roll = rng.range(0, 100);
        let call_us = micros(epoch);
        let (input, result, acked) = if roll < workload.mix.append_percent {
            let element = format!("x {client_id} {appends} y");
            appends += 1;
            let result = clerk
                .append(key.as_bytes(), element.as_bytes())
                .map(|()| KvOutput::Append);
            let acked = result.is_ok().then(|| (key.clone(), element.clone()));
            (
                KvInput::Append {
                    key,
                    value: element,
                },
                result,
                acked,
            )
        } else if roll < workload.mix.append_percent + workload.mix.put_percent {
            // Puts go to keys of their own, so the append-order check on the
            // appended keys stays meaningful (a put would erase elements).
            let key = format!("{key}-p");
            let value = format!("p {client} {}", rng.next_u64() % 1000);
            let result = clerk
                .put(key.as_bytes(), value.as_bytes())
                .map(|()| KvOutput::Put);
            (KvInput::Put { key, value }, result, None)
        } else {
            let key = if rng.chance(1, 4) {
                format!("{key}-p")
            } else {
                key
            };
            let result = clerk.get(key.as_bytes()).map(|value| KvOutput::Get {
                value: value.map(|v| String::from_utf8(v).expect("utf-8 values")),
            });
            (KvInput::Get { key }, result, None)
        };
        let (output, return_us) = match result {
            Ok(output) => (
                Some(output),
                Some(kvstore_raft::check::return_stamp_us(epoch)),
            ),
            Err(ClerkError::Timeout { .. } | ClerkError::Unknown { .. }) => (None, None),
            Err(other) => panic!("client {client}: unexpected error: {other}"),
        };
        ops.push((
            Operation {
                client_id,
                input,
                call_us,
                output,
                return_us,
            },
            acked,
        ));
    }
    ops
}

/// Checks the history (linearizable within `timeout`, a timeout counts as
/// a failure) and the append-order rule against the final values read
/// through `final_clerk`.
pub fn check_all(recorded: &Recorded, final_clerk: &mut Clerk, timeout: Duration) {
    match check::check(&recorded.history, timeout) {
        Verdict::Linearizable => {}
        Verdict::NotLinearizable { key, ops } => panic!(
            "history not linearizable on key {key:?} (whole history: {}); smallest failing prefix: {ops:#?}",
            save_history(&recorded.history)
        ),
        Verdict::Timeout => panic!(
            "linearizability check timed out ({} ops; history: {})",
            recorded.history.len(),
            save_history(&recorded.history)
        ),
    }
    for (key, acked) in &recorded.acked_appends {
        let value = final_clerk
            .get(key.as_bytes())
            .expect("final read")
            .unwrap_or_default();
        let value = String::from_utf8(value).expect("utf-8 values");
        if let Err(violation) = check::check_appends(&value, acked) {
            panic!("key {key:?}: {violation}\nfinal value: {value:?}");
        }
    }
}

/// Writes a failing history where `chaos --check-history` can check it
/// again, and says where (or why not).
fn save_history(history: &[Operation]) -> String {
    static SAVED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SAVED.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("kv-history-{}-{n}.jsonl", std::process::id()));
    let written = std::fs::File::create(&path)
        .and_then(|file| check::write_history_jsonl(std::io::BufWriter::new(file), history));
    match written {
        Ok(()) => path.display().to_string(),
        Err(e) => format!("not saved: {e}"),
    }
}

/// A transport that loses requests and replies and delays calls, like the
/// 6.824 unreliable network: `drop_percent` of requests never reach the
/// server, `drop_percent` of replies never reach the clerk (the call was
/// executed), and every call waits 0..`max_delay_ms` first.
pub struct LossyChannel<C> {
    pub inner: C,
    pub drop_percent: u64,
    pub max_delay_ms: u64,
    pub rng: Mutex<SplitMix64>,
    pub enabled: Arc<AtomicBool>,
}

impl<C: RpcChannel> RpcChannel for LossyChannel<C> {
    fn call_method(
        &self,
        service_id: u32,
        method_id: u32,
        request: &[u8],
    ) -> Result<Vec<u8>, RpcError> {
        if !self.enabled.load(Ordering::SeqCst) {
            return self.inner.call_method(service_id, method_id, request);
        }
        let (delay_ms, drop_request, drop_reply) = {
            let mut rng = self.rng.lock();
            (
                rng.range(0, self.max_delay_ms + 1),
                rng.chance(self.drop_percent, 100),
                rng.chance(self.drop_percent, 100),
            )
        };
        std::thread::sleep(Duration::from_millis(delay_ms));
        let lost = || RpcError::Decode("lost by the test's lossy channel".into());
        if drop_request {
            return Err(lost());
        }
        let reply = self.inner.call_method(service_id, method_id, request);
        if drop_reply {
            return Err(lost());
        }
        reply
    }
}
