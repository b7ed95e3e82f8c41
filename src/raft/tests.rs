//! Smoke tests of the core through a tiny lossless in-memory network. The
//! full scenario suite (faults, crashes, invariants) is tests/raft_sim.rs.

use super::*;

struct Cluster {
    cores: Vec<RaftCore>,
    applied: Vec<Vec<Entry>>,
}

impl Cluster {
    fn new(size: u64) -> Cluster {
        let voters: Vec<NodeId> = (1..=size).collect();
        let cores = voters
            .iter()
            .map(|&id| RaftCore::new(Config::new(id, voters.clone()), RestoredState::default()))
            .collect();
        Cluster {
            cores,
            applied: vec![Vec::new(); size as usize],
        }
    }

    /// Runs Ready cycles until no core has anything left to do.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut inbox = Vec::new();
            for (k, core) in self.cores.iter_mut().enumerate() {
                if !core.has_ready() {
                    continue;
                }
                let ready = core.ready();
                inbox.extend(ready.messages_unpersisted);
                inbox.extend(ready.messages);
                self.applied[k].extend(ready.committed);
                core.advance();
            }
            if inbox.is_empty() {
                return;
            }
            for message in inbox {
                self.cores[message.to as usize - 1].step(message);
            }
        }
        panic!("the cluster did not settle");
    }

    fn tick_until_leader(&mut self) -> usize {
        for _ in 0..100 {
            for core in &mut self.cores {
                core.tick();
            }
            self.settle();
            if let Some(k) = self.cores.iter().position(|c| c.role() == Role::Leader) {
                return k;
            }
        }
        panic!("no leader elected");
    }
}

#[test]
fn three_nodes_elect_a_leader_and_replicate() {
    let mut cluster = Cluster::new(3);
    let leader = cluster.tick_until_leader();
    let first = cluster.cores[leader].propose(b"a".to_vec()).unwrap();
    cluster.cores[leader].propose(b"b".to_vec()).unwrap();
    cluster.settle();
    for core in &mut cluster.cores {
        core.tick();
        core.tick();
    }
    cluster.settle();
    for (k, applied) in cluster.applied.iter().enumerate() {
        let data: Vec<&[u8]> = applied
            .iter()
            .filter(|e| !e.data.is_empty())
            .map(|e| &e.data[..])
            .collect();
        assert_eq!(data, vec![&b"a"[..], &b"b"[..]], "node {}", k + 1);
        assert_eq!(applied.last().unwrap().index, first + 1);
    }
}

#[test]
fn read_index_is_released_after_a_heartbeat_round() {
    let mut cluster = Cluster::new(3);
    let leader = cluster.tick_until_leader();
    cluster.cores[leader].read_index(7).unwrap();
    let ready = cluster.cores[leader].ready();
    assert!(
        ready.read_states.is_empty(),
        "a read needs a quorum round first"
    );
    let heartbeats = ready.messages_unpersisted.len();
    assert_eq!(heartbeats, 2);
    for message in ready.messages_unpersisted {
        cluster.cores[message.to as usize - 1].step(message);
    }
    cluster.cores[leader].advance();
    let mut released = Vec::new();
    for _ in 0..4 {
        let mut inbox = Vec::new();
        for core in &mut cluster.cores {
            if core.has_ready() {
                let ready = core.ready();
                released.extend(ready.read_states);
                inbox.extend(ready.messages);
                inbox.extend(ready.messages_unpersisted);
                core.advance();
            }
        }
        for message in inbox {
            cluster.cores[message.to as usize - 1].step(message);
        }
    }
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].context, 7);
    assert_eq!(released[0].index, cluster.cores[leader].status().commit);
}

#[test]
fn snapshot_catches_up_a_follower() {
    let mut cluster = Cluster::new(3);
    let leader = cluster.tick_until_leader();
    // Node `lagging` misses everything below.
    let lagging = (leader + 1) % 3;
    let mut saved = std::mem::replace(
        &mut cluster.cores[lagging],
        RaftCore::new(Config::new(99, vec![99]), RestoredState::default()),
    );
    for k in 0..20u8 {
        cluster.cores[leader].propose(vec![k + 1]).unwrap();
    }
    cluster.settle();
    let applied = cluster.cores[leader].status().applied;
    cluster.cores[leader].compact(applied, b"state".to_vec());
    std::mem::swap(&mut cluster.cores[lagging], &mut saved);
    let mut snapshot_seen = false;
    for _ in 0..20 {
        for core in &mut cluster.cores {
            core.tick();
        }
        for _ in 0..50 {
            let mut inbox = Vec::new();
            for core in &mut cluster.cores {
                if core.has_ready() {
                    let ready = core.ready();
                    snapshot_seen |= ready.snapshot.is_some();
                    inbox.extend(ready.messages_unpersisted);
                    inbox.extend(ready.messages);
                    core.advance();
                }
            }
            for message in inbox {
                cluster.cores[message.to as usize - 1].step(message);
            }
        }
    }
    assert!(
        snapshot_seen,
        "the lagging follower must receive the snapshot"
    );
    let status = cluster.cores[lagging].status();
    assert!(status.snapshot_index >= applied, "{status:?}");
    assert_eq!(status.commit, cluster.cores[leader].status().commit);
}
