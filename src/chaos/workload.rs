//! The clients: C threads, each one clerk (one session), running random
//! operations on a few hot keys until told to stop, and recording each one
//! with its call and return times on the run's clock: a timed-out operation
//! is recorded without output (outcome unknown), as the checker wants.
//!
//! Keys have one of two roles, so that the final values can be checked too:
//! "append keys" (`a0`, `a1`, ...) only see appends and gets, every append
//! carrying a unique element `x <client> <j> y`, so every acknowledged append
//! must appear exactly once in the final value; "register keys" (`r0`, ...)
//! see puts, compare-and-swaps and gets.
//!
//! A share of the gets go straight to one node picked at random, with a
//! short deadline, as from a client whose idea of the leader is stale: a
//! deposed leader that still answers reads is then caught reading stale
//! data. Such a read that gets no answer in time (the node is not the
//! leader) is counted but left out of the history: a read of unknown
//! outcome tells the checker nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::check::{KvInput, KvOutput, Operation};
use crate::clerk::{Clerk, ClerkError, ClerkOptions};
use crate::config::ClusterConfig;
use crate::raft::SplitMix64;

/// A client's deadline for one operation, retries included: short, so that
/// faults leave operations of unknown outcome in the history.
pub const OPERATION_TIMEOUT_MS: u64 = 2_000;
/// A client's limit on one RPC to one node.
const ATTEMPT_TIMEOUT_MS: u64 = 300;
/// The most a client waits between two operations: the clients sample the
/// cluster rather than load it, which keeps the history checkable.
const THINK_MS_MAX: u64 = 40;
/// The most operations one client records (about 25 per second for hours).
const MAX_OPS_PER_CLIENT: usize = 100_000;
/// One get in this many goes straight to a random node.
const DIRECT_READ_ONE_IN: u64 = 3;
/// A direct read's deadline: a node that leads answers at once.
const DIRECT_READ_TIMEOUT_MS: u64 = 200;

/// The keys of a run with `keys` keys: the append keys, then the registers.
pub fn key_names(keys: usize) -> (Vec<String>, Vec<String>) {
    let appends = keys.div_ceil(2);
    (
        (0..appends).map(|i| format!("a{i}")).collect(),
        (0..keys - appends).map(|i| format!("r{i}")).collect(),
    )
}

/// What the clients did.
#[derive(Debug, Default)]
pub struct Recorded {
    pub ops: Vec<Operation>,
}

/// Counts of outcomes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpCounts {
    pub ok: u64,
    /// Refused for good: nothing was applied.
    pub failed: u64,
    /// Timed out: may or may not have taken effect.
    pub unknown: u64,
    /// Gets sent straight to one node that gave no answer in time (it was
    /// not the leader); not in the history.
    pub direct_unanswered: u64,
}

/// One clerk's options for the chaos clients (each clerk opens its own
/// session on its first write; `_client` numbers it in the history only).
pub fn clerk_options(_client: u64, timeout_ms: u64) -> ClerkOptions {
    ClerkOptions {
        timeout: Duration::from_millis(timeout_ms),
        attempt_timeout_ms: ATTEMPT_TIMEOUT_MS,
        ..ClerkOptions::default()
    }
}

/// Runs `clients` client threads until `stop` is set; returns every
/// operation, failed ones marked. Client numbers are 1..=clients.
pub fn run_clients(
    config: &ClusterConfig,
    clients: u64,
    keys: usize,
    seed: u64,
    epoch: Instant,
    stop: &AtomicBool,
) -> (Recorded, OpCounts) {
    let (append_keys, register_keys) = key_names(keys);
    let results: Vec<(Vec<Operation>, OpCounts)> = thread::scope(|scope| {
        let handles: Vec<_> = (1..=clients)
            .map(|client| {
                let mut worker = Client {
                    number: client,
                    clerk: Clerk::new(config, clerk_options(client, OPERATION_TIMEOUT_MS)),
                    direct: direct_clerks(config, client),
                    rng: SplitMix64::new(seed ^ client.wrapping_mul(0xA24B_AED4_963E_E407)),
                    append_keys: &append_keys,
                    register_keys: &register_keys,
                    appends: 0,
                    writes: 0,
                    last_seen: Default::default(),
                    epoch,
                    ops: Vec::new(),
                    counts: OpCounts::default(),
                };
                scope.spawn(move || {
                    worker.run(stop);
                    (worker.ops, worker.counts)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a chaos client panicked"))
            .collect()
    });
    let mut recorded = Recorded::default();
    let mut counts = OpCounts::default();
    for (ops, c) in results {
        recorded.ops.extend(ops);
        counts.ok += c.ok;
        counts.failed += c.failed;
        counts.unknown += c.unknown;
        counts.direct_unanswered += c.direct_unanswered;
    }
    (recorded, counts)
}

struct Client<'a> {
    number: u64,
    clerk: Clerk,
    /// One clerk per node, each knowing only that node.
    direct: Vec<Clerk>,
    rng: SplitMix64,
    append_keys: &'a [String],
    register_keys: &'a [String],
    appends: u64,
    writes: u64,
    /// The last value this client saw per register key: the expected value
    /// of its next compare-and-swap, so that some of them succeed.
    last_seen: std::collections::HashMap<String, String>,
    epoch: Instant,
    ops: Vec<Operation>,
    counts: OpCounts,
}

impl Client<'_> {
    fn run(&mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::SeqCst) && self.ops.len() < MAX_OPS_PER_CLIENT {
            let input = self.next_input();
            let direct =
                matches!(input, KvInput::Get { .. }) && self.rng.chance(1, DIRECT_READ_ONE_IN);
            let op = if direct {
                let node = self.rng.range(0, self.direct.len() as u64) as usize;
                let op = record(&mut self.direct[node], input, self.number, self.epoch);
                if op.output.is_none() {
                    self.counts.direct_unanswered += 1;
                    continue;
                }
                op
            } else {
                record(&mut self.clerk, input, self.number, self.epoch)
            };
            self.count(&op);
            if op.output.is_none() && op.return_us.is_some() {
                // Refused for good, so not applied: not part of the history.
                continue;
            }
            if let Some(KvOutput::Get { value: Some(value) }) = &op.output {
                self.last_seen
                    .insert(op.input.key().to_string(), value.clone());
            }
            if let Some(KvOutput::Cas {
                current: Some(current),
                swapped: false,
                ..
            }) = &op.output
            {
                self.last_seen
                    .insert(op.input.key().to_string(), current.clone());
            }
            self.ops.push(op);
            thread::sleep(Duration::from_millis(self.rng.range(0, THINK_MS_MAX + 1)));
        }
    }

    fn count(&mut self, op: &Operation) {
        match (&op.output, op.return_us) {
            (Some(_), Some(_)) => self.counts.ok += 1,
            (None, Some(_)) => self.counts.failed += 1,
            _ => self.counts.unknown += 1,
        }
    }

    fn next_input(&mut self) -> KvInput {
        let use_appends = self.register_keys.is_empty() || self.rng.chance(1, 2);
        if use_appends {
            let key = pick(&mut self.rng, self.append_keys);
            if self.rng.chance(3, 5) {
                self.appends += 1;
                KvInput::Append {
                    key,
                    value: format!("x {} {} y", self.number, self.appends),
                }
            } else {
                KvInput::Get { key }
            }
        } else {
            let key = pick(&mut self.rng, self.register_keys);
            self.writes += 1;
            match self.rng.range(0, 10) {
                0..=2 => KvInput::Put {
                    value: format!("p{}-{}", self.number, self.writes),
                    key,
                },
                3..=6 => KvInput::Cas {
                    expected: self.last_seen.get(&key).cloned().unwrap_or_default(),
                    value: format!("c{}-{}", self.number, self.writes),
                    key,
                },
                _ => KvInput::Get { key },
            }
        }
    }
}

/// A clerk per node of `config`, each with a cluster of that node alone.
fn direct_clerks(config: &ClusterConfig, client: u64) -> Vec<Clerk> {
    config
        .raft_nodes
        .iter()
        .map(|node| {
            let alone = ClusterConfig {
                raft_nodes: vec![node.clone()],
                ..config.clone()
            };
            let options = ClerkOptions {
                attempt_timeout_ms: DIRECT_READ_TIMEOUT_MS,
                ..clerk_options(client, DIRECT_READ_TIMEOUT_MS)
            };
            Clerk::new(&alone, options)
        })
        .collect()
}

fn pick(rng: &mut SplitMix64, keys: &[String]) -> String {
    keys[rng.range(0, keys.len() as u64) as usize].clone()
}

/// Runs `input` through `clerk` and records it as client `client`. A
/// timeout leaves output and return time unset (outcome unknown); a
/// rejection sets the return time but no output (it failed, nothing was
/// applied, and the checker leaves it out).
pub fn record(clerk: &mut Clerk, input: KvInput, client: u64, epoch: Instant) -> Operation {
    let call_us = epoch.elapsed().as_micros() as u64;
    let result = execute(clerk, &input);
    let return_us = crate::check::return_stamp_us(epoch);
    let (output, return_us) = match result {
        Ok(output) => (Some(output), Some(return_us)),
        Err(ClerkError::Timeout { .. } | ClerkError::Unknown { .. }) => (None, None),
        Err(ClerkError::Rejected(message)) => {
            log::warn!("client {client}: {input:?} rejected: {message}");
            (None, Some(return_us))
        }
    };
    Operation {
        client_id: client,
        input,
        call_us,
        output,
        return_us,
    }
}

fn execute(clerk: &mut Clerk, input: &KvInput) -> Result<KvOutput, ClerkError> {
    let text = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned();
    Ok(match input {
        KvInput::Get { key } => KvOutput::Get {
            value: clerk.get(key)?.map(text),
        },
        KvInput::Put { key, value } => {
            clerk.put(key, value)?;
            KvOutput::Put
        }
        KvInput::Append { key, value } => {
            clerk.append(key, value)?;
            KvOutput::Append
        }
        KvInput::Delete { key } => KvOutput::Delete {
            existed: clerk.delete(key)?,
        },
        KvInput::Cas {
            key,
            expected,
            value,
        } => {
            let result = clerk.cas(key, expected, value)?;
            KvOutput::Cas {
                swapped: result.swapped,
                found: result.found,
                // The model reads a missing key as ""; an old value the
                // server did not retain is checked on swapped/found only.
                current: match result.current_unknown {
                    Some(_) => None,
                    None => Some(result.current.map(text).unwrap_or_default()),
                },
            }
        }
    })
}
