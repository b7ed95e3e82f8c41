//! Three in-process nodes, each on its own simulated disk (`SimFs`), under
//! a write load; the power fails on all three disks at once at a seeded
//! moment; the disks keep only what completed fsyncs covered (or a random
//! prefix of the rest); the cluster restarts, and every acknowledged write
//! must still be there.
//!
//! The old leader's disk is fast and the followers' slow, and the followers
//! are restarted first, alone: they must hold every acknowledged write
//! between them, since the leader counts a follower's acknowledgement as a
//! durable copy. A follower that acknowledges entries before they are
//! durable leaves acknowledged writes only in its cache for most of each of
//! its fsyncs; the two followers then elect a leader without them, commit
//! over them, and the old leader's copies are overwritten when it returns.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::TestCluster;
use kvstore_raft::raft::{NodeId, SplitMix64};
use kvstore_raft::storage::{FileSystem, PowerLoss, SimFs};
use parking_lot::Mutex;

const ROUNDS: u64 = 3;
const WRITERS: u64 = 3;
const SLOW_SYNC: Duration = Duration::from_millis(25);

type Acked = Arc<Mutex<Vec<(String, String)>>>;

fn write_until(cluster: &TestCluster, round: u64, stop: &Arc<AtomicBool>, acked: &Acked) {
    std::thread::scope(|scope| {
        for writer in 0..WRITERS {
            let mut clerk = cluster.clerk(1_500);
            let (stop, acked) = (Arc::clone(stop), Arc::clone(acked));
            scope.spawn(move || {
                for n in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let key = format!("r{round}-w{writer}-{n}");
                    let value = format!("value of {key}");
                    if clerk.put(&key, &value).is_ok() {
                        acked.lock().push((key, value));
                    }
                }
            });
        }
    });
}

#[test]
fn power_loss_on_every_disk_keeps_every_acknowledged_write() {
    let disks: Vec<SimFs> = (0..3).map(|_| SimFs::new()).collect();
    let file_systems = disks
        .iter()
        .map(|d| Arc::new(d.clone()) as Arc<dyn FileSystem>)
        .collect();
    let cluster = TestCluster::start_on(3, "", file_systems);
    let mut rng = SplitMix64::new(0x5eed_d15c);
    let acked: Acked = Arc::default();
    for round in 0..ROUNDS {
        let leader = cluster.wait_leader(Duration::from_secs(20));
        for (k, disk) in disks.iter().enumerate() {
            let slow = k as NodeId + 1 != leader;
            disk.set_sync_delay(if slow { SLOW_SYNC } else { Duration::ZERO });
        }
        let before = acked.lock().len();
        let stop = Arc::new(AtomicBool::new(false));
        let power_fails_after = Duration::from_millis(rng.range(400, 900));
        std::thread::scope(|scope| {
            scope.spawn(|| write_until(&cluster, round, &stop, &acked));
            std::thread::sleep(power_fails_after);
            for disk in &disks {
                disk.crash_now();
            }
            stop.store(true, Ordering::SeqCst);
        });
        let written = acked.lock().len() - before;
        assert!(written > 0, "round {round}: no write was acknowledged");
        for id in 1..=3 {
            cluster.stop_node(id);
        }
        for (k, disk) in disks.iter().enumerate() {
            disk.set_sync_delay(Duration::ZERO);
            disk.power_loss(if round % 2 == 0 {
                PowerLoss::Strict
            } else {
                PowerLoss::TornPrefix {
                    seed: round * 3 + k as u64,
                }
            });
        }
        // The followers alone first: a majority that must hold every
        // acknowledged write. A write through them commits at a new term.
        let followers: Vec<NodeId> = (1..=3).filter(|&id| id != leader).collect();
        for &id in &followers {
            cluster.start_node(id);
        }
        let mut clerk = cluster.clerk_for(&followers, 20_000);
        clerk
            .put(format!("marker-{round}"), "after the power loss")
            .expect("the followers elect a leader and commit");
        cluster.start_node(leader);
        let mut reader = cluster.clerk(20_000);
        let mut lost = Vec::new();
        for (key, value) in acked.lock().iter() {
            let got = reader.get(key).expect("read after the restart");
            if got.as_deref() != Some(value.as_bytes()) {
                lost.push(key.clone());
            }
        }
        assert!(
            lost.is_empty(),
            "round {round} (old leader {leader}, power lost after {power_fails_after:?}, \
             {written} writes acknowledged): {} acknowledged writes lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        eprintln!("round {round}: {written} acknowledged writes, all kept");
    }
    assert!(disks.iter().all(|d| d.counters().power_losses == ROUNDS));
}
