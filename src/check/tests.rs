//! Tests of the linearizability checker on small hand-made histories and on
//! large random ones generated from a sequential simulation.

use super::*;
use crate::raft::SplitMix64;
use std::time::Instant;

const TIMEOUT: Duration = Duration::from_secs(10);

fn done(
    client_id: u64,
    input: KvInput,
    call_us: u64,
    return_us: u64,
    output: KvOutput,
) -> Operation {
    Operation {
        client_id,
        input,
        call_us,
        output: Some(output),
        return_us: Some(return_us),
    }
}

fn unknown(client_id: u64, input: KvInput, call_us: u64) -> Operation {
    Operation {
        client_id,
        input,
        call_us,
        output: None,
        return_us: None,
    }
}

fn get(key: &str) -> KvInput {
    KvInput::Get { key: key.into() }
}
fn put(key: &str, value: &str) -> KvInput {
    KvInput::Put {
        key: key.into(),
        value: value.into(),
    }
}
fn append(key: &str, value: &str) -> KvInput {
    KvInput::Append {
        key: key.into(),
        value: value.into(),
    }
}
fn read(value: &str) -> KvOutput {
    KvOutput::Get {
        value: Some(value.into()),
    }
}

fn verdict(history: &[Operation]) -> Verdict {
    check(history, TIMEOUT)
}

fn assert_not_linearizable(history: &[Operation], key: &str) -> Vec<Operation> {
    match verdict(history) {
        Verdict::NotLinearizable { key: bad, ops } => {
            assert_eq!(bad, key);
            ops
        }
        other => panic!("expected NotLinearizable, got {other:?}"),
    }
}

#[test]
fn sequential_and_concurrent_histories_pass() {
    let history = [
        done(1, get("x"), 0, 5, KvOutput::Get { value: None }),
        done(1, put("x", "1"), 10, 20, KvOutput::Put),
        done(2, get("x"), 30, 40, read("1")),
        // A read overlapping a put may see either value.
        done(1, put("x", "2"), 50, 100, KvOutput::Put),
        done(2, get("x"), 60, 70, read("1")),
        done(3, get("x"), 80, 90, read("2")),
        done(
            2,
            KvInput::Delete { key: "x".into() },
            110,
            120,
            KvOutput::Delete { existed: true },
        ),
        done(2, get("x"), 130, 140, KvOutput::Get { value: None }),
    ];
    assert_eq!(verdict(&history), Verdict::Linearizable);
    assert_eq!(verdict(&[]), Verdict::Linearizable);
}

#[test]
fn stale_read_after_a_completed_put_fails() {
    let history = [
        done(1, put("x", "1"), 0, 10, KvOutput::Put),
        done(1, put("x", "2"), 20, 30, KvOutput::Put),
        done(2, get("x"), 40, 50, read("1")),
        // Ops on other keys and later ops on x are not part of the report.
        done(3, put("y", "1"), 0, 100, KvOutput::Put),
        done(2, get("x"), 60, 70, read("2")),
    ];
    let ops = assert_not_linearizable(&history, "x");
    assert_eq!(ops, history[..3].to_vec());
}

#[test]
fn lost_and_duplicated_appends_fail() {
    let lost = [
        done(1, append("x", "a"), 0, 10, KvOutput::Append),
        done(2, append("x", "b"), 20, 30, KvOutput::Append),
        done(3, get("x"), 40, 50, read("b")),
    ];
    assert_not_linearizable(&lost, "x");
    let duplicated = [
        done(1, append("x", "a"), 0, 10, KvOutput::Append),
        done(2, get("x"), 20, 30, read("aa")),
    ];
    assert_not_linearizable(&duplicated, "x");
    let concurrent = [
        done(1, append("x", "a"), 0, 30, KvOutput::Append),
        done(2, append("x", "b"), 10, 20, KvOutput::Append),
        done(3, get("x"), 40, 50, read("ba")),
    ];
    assert_eq!(verdict(&concurrent), Verdict::Linearizable);
}

#[test]
fn a_put_of_unknown_outcome_may_or_may_not_take_effect() {
    let base = [
        done(1, put("x", "1"), 0, 10, KvOutput::Put),
        unknown(2, put("x", "2"), 20),
    ];
    let mut visible = base.to_vec();
    visible.push(done(3, get("x"), 30, 40, read("2")));
    assert_eq!(verdict(&visible), Verdict::Linearizable);
    let mut invisible = base.to_vec();
    invisible.push(done(3, get("x"), 30, 40, read("1")));
    assert_eq!(verdict(&invisible), Verdict::Linearizable);
    // But once seen it stays: "2" then "1" is not linearizable.
    let mut flicker = visible.clone();
    flicker.push(done(3, get("x"), 50, 60, read("1")));
    assert_not_linearizable(&flicker, "x");
    // An unknown op never takes effect before its call.
    let early = [
        done(3, get("x"), 0, 5, read("2")),
        unknown(2, put("x", "2"), 20),
    ];
    assert_not_linearizable(&early, "x");
}

#[test]
fn cas_and_delete_outputs_are_checked() {
    let cas = |expected: &str, value: &str| KvInput::Cas {
        key: "x".into(),
        expected: expected.into(),
        value: value.into(),
    };
    let cas_out = |swapped, found, current: Option<&str>| KvOutput::Cas {
        swapped,
        found,
        current: current.map(Into::into),
    };
    let good = [
        done(1, cas("", "1"), 0, 10, cas_out(true, false, Some(""))),
        done(1, cas("0", "2"), 20, 30, cas_out(false, true, Some("1"))),
        done(1, cas("1", "3"), 40, 50, cas_out(true, true, None)),
        done(2, get("x"), 60, 70, read("3")),
        done(
            2,
            KvInput::Delete { key: "x".into() },
            80,
            90,
            KvOutput::Delete { existed: true },
        ),
    ];
    assert_eq!(verdict(&good), Verdict::Linearizable);
    let wrong_current = [
        done(1, put("x", "1"), 0, 10, KvOutput::Put),
        done(1, cas("0", "2"), 20, 30, cas_out(false, true, Some("0"))),
    ];
    assert_not_linearizable(&wrong_current, "x");
    let wrong_existed = [done(
        1,
        KvInput::Delete { key: "x".into() },
        0,
        10,
        KvOutput::Delete { existed: true },
    )];
    assert_not_linearizable(&wrong_existed, "x");
}

#[test]
fn a_zero_timeout_gives_timeout() {
    let history = [done(1, put("x", "1"), 0, 10, KvOutput::Put)];
    assert_eq!(check(&history, Duration::ZERO), Verdict::Timeout);
}

#[test]
fn a_history_survives_json_lines() {
    let history = [
        done(1, put("x", "1"), 0, 10, KvOutput::Put),
        unknown(2, append("x", "2"), 20),
        done(
            3,
            KvInput::Cas {
                key: "x".into(),
                expected: "1".into(),
                value: "3".into(),
            },
            5,
            50,
            KvOutput::Cas {
                swapped: true,
                found: true,
                current: None,
            },
        ),
    ];
    let mut bytes = Vec::new();
    write_history_jsonl(&mut bytes, &history).unwrap();
    assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 3);
    assert_eq!(read_history_jsonl(&bytes[..]).unwrap(), history.to_vec());
    let error = read_history_jsonl(&b"\n{\"client_id\": 1}\n"[..]).unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("history line 2: missing field"),
        "{error}"
    );
}

/// A random history of `clients` clients on `keys` keys that is linearizable
/// by construction: each operation takes effect at a distinct instant inside
/// its [call, return] interval, in a sequential simulation of the store, and
/// intervals of different clients overlap. Some operations time out; those
/// take effect or not, at random.
fn random_linearizable_history(seed: u64, clients: u64, keys: u64, count: usize) -> Vec<Operation> {
    let mut rng = SplitMix64::new(seed);
    let mut store: BTreeMap<String, String> = BTreeMap::new();
    let mut next_free_us = vec![0u64; clients as usize];
    let mut history = Vec::with_capacity(count);
    let mut now_us = 0u64;
    while history.len() < count {
        now_us += 10;
        let client = rng.range(0, clients);
        if next_free_us[client as usize] > now_us {
            continue;
        }
        let call_us = now_us - rng.range(0, 10).min(now_us - next_free_us[client as usize]);
        let return_us = now_us + rng.range(1, 60);
        next_free_us[client as usize] = return_us + 1;
        let key = format!("k{}", rng.range(0, keys));
        let current = store.get(&key).cloned();
        let value = format!("{}.{};", client, history.len());
        let (input, output) = match rng.range(0, 10) {
            0..=3 => (
                get(&key),
                KvOutput::Get {
                    value: current.clone(),
                },
            ),
            4..=7 => {
                store.insert(key.clone(), current.clone().unwrap_or_default() + &value);
                (append(&key, &value), KvOutput::Append)
            }
            8 => {
                store.insert(key.clone(), value.clone());
                (put(&key, &value), KvOutput::Put)
            }
            _ => {
                let expected = current.clone().unwrap_or_default();
                store.insert(key.clone(), value.clone());
                let output = KvOutput::Cas {
                    swapped: true,
                    found: current.is_some(),
                    current: Some(expected.clone()),
                };
                (
                    KvInput::Cas {
                        key: key.clone(),
                        expected,
                        value,
                    },
                    output,
                )
            }
        };
        let timed_out = rng.chance(1, 50);
        if timed_out && !matches!(input, KvInput::Get { .. }) && rng.chance(1, 2) {
            // Took no effect after all: undo it in the simulation.
            match &current {
                Some(value) => store.insert(key.clone(), value.clone()),
                None => store.remove(&key),
            };
        }
        history.push(if timed_out {
            unknown(client, input, call_us)
        } else {
            done(client, input, call_us, return_us, output)
        });
    }
    history
}

#[test]
fn large_random_linearizable_history_checks_quickly() {
    for seed in 1..=3 {
        let history = random_linearizable_history(seed, 8, 4, 2_000);
        // The history must exercise the hard parts: overlap and unknown outcomes.
        let unknown_count = history.iter().filter(|op| op.output.is_none()).count();
        let overlapping = history
            .windows(2)
            .filter(|pair| pair[1].call_us < pair[0].return_us.unwrap_or(u64::MAX))
            .count();
        assert!(
            unknown_count > 10 && overlapping > 500,
            "{unknown_count} unknown, {overlapping} overlapping"
        );
        let start = Instant::now();
        assert_eq!(verdict(&history), Verdict::Linearizable, "seed {seed}");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "seed {seed} took {:?}",
            start.elapsed()
        );
    }
}

#[test]
fn a_corrupted_random_history_fails_at_the_corruption() {
    let mut history = random_linearizable_history(9, 5, 2, 400);
    // Make a completed read in the middle see a value that never existed.
    let (index, key) = history
        .iter()
        .enumerate()
        .skip(200)
        .find_map(|(i, op)| match (&op.input, &op.output) {
            (KvInput::Get { key }, Some(_)) => Some((i, key.clone())),
            _ => None,
        })
        .unwrap();
    history[index].output = Some(read("never written"));
    let ops = assert_not_linearizable(&history, &key);
    let end_us = history[index].return_us.unwrap();
    assert!(ops.contains(&history[index]));
    assert!(
        ops.iter().all(|op| op.call_us <= end_us),
        "the report stops at the bad read"
    );
}

/// Twenty concurrent appends read back in one order: without the prefix-chain
/// pruning the search tries the orders of the appends one by one (20! of
/// them); with it the verdict comes at once. Then the same appends with a
/// read that contradicts real time: the pruning must not hide it.
#[test]
fn many_concurrent_appends_are_decided_quickly_both_ways() {
    let count = 20u64;
    let element = |i: u64| format!("x {i} y");
    let mut history: Vec<Operation> = (0..count)
        .map(|i| done(i, append("k", &element(i)), i, 1_000 + i, KvOutput::Append))
        .collect();
    // The appends took effect in reverse order of their calls.
    let all: String = (0..count).rev().map(element).collect();
    history.push(done(99, get("k"), 2_000, 2_010, read(&all)));
    // Within the checker's deadline, or the verdict is Timeout.
    assert_eq!(
        check(&history, Duration::from_secs(5)),
        Verdict::Linearizable
    );

    // A read that finished before append 0 began may not contain it.
    let mut bad = history.clone();
    for op in bad.iter_mut().filter(|op| op.client_id == 0) {
        (op.call_us, op.return_us) = (3_000, Some(3_010));
    }
    bad.push(done(98, get("k"), 2_500, 2_600, read(&all)));
    assert!(matches!(
        check(&bad, Duration::from_secs(5)),
        Verdict::NotLinearizable { .. }
    ));
}

/// Records one operation of a sequential client the way the recorders do
/// (call stamped now, return stamped by `return_stamp_us`), with no delay
/// between operations, as a closed-loop workload issues them.
fn recorded(epoch: Instant, client_id: u64, input: KvInput, output: KvOutput) -> Operation {
    let call_us = micros_since(epoch);
    let return_us = return_stamp_us(epoch);
    done(client_id, input, call_us, return_us, output)
}

/// Regression: times were stamped in whole microseconds, and a client's next
/// call usually fell on its previous return's microsecond; calls sort before
/// returns at equal times, so the two operations counted as concurrent, and
/// a read that missed the client's own completed write passed (3,124 of
/// 3,990 consecutive pairs of one client in k3_concurrent_five_clerks).
#[test]
fn one_clients_operations_are_in_program_order() {
    let epoch = Instant::now();
    for _ in 0..200 {
        let history = [
            recorded(epoch, 1, put("x", "1"), KvOutput::Put),
            recorded(epoch, 1, get("x"), KvOutput::Get { value: None }),
        ];
        assert!(history[1].call_us > history[0].return_us.unwrap());
        assert_not_linearizable(&history, "x");
        let history = [
            recorded(epoch, 1, append("y", "a"), KvOutput::Append),
            recorded(epoch, 1, append("y", "b"), KvOutput::Append),
            recorded(epoch, 2, get("y"), read("ba")),
        ];
        assert_not_linearizable(&history, "y");
    }
    // What the checker is given decides: the same histories with the next
    // call at the previous return's microsecond read as concurrent (the
    // reading needed across clients, whose clocks cannot order events
    // within a microsecond).
    let touching = [
        done(1, put("x", "1"), 10, 20, KvOutput::Put),
        done(1, get("x"), 20, 30, KvOutput::Get { value: None }),
    ];
    assert_eq!(verdict(&touching), Verdict::Linearizable);
}

#[test]
fn history_lines_with_unknown_fields_are_refused() {
    let good = r#"{"client_id":1,"input":{"op":"get","key":"x"},"call_us":1,"output":{"op":"get","value":null},"return_us":2}"#;
    assert_eq!(read_history_jsonl(good.as_bytes()).unwrap().len(), 1);
    for bad in [
        good.replace("\"output\"", "\"ouptut\""),
        good.replace("\"return_us\":2", "\"return_us\":2,\"extra\":0"),
        good.replace("\"value\":null", "\"value\":null,\"vaule\":1"),
    ] {
        let error = read_history_jsonl(bad.as_bytes()).unwrap_err().to_string();
        assert!(
            error.starts_with("history line 1: unknown field"),
            "{bad}: {error}"
        );
    }
}
