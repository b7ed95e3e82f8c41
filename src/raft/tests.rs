//! Smoke tests of the core through a tiny lossless in-memory network. The
//! full scenario suite (faults, crashes, invariants) is tests/raft_sim.rs.

use super::*;

struct Cluster {
    cores: Vec<RaftCore>,
    applied: Vec<Vec<Entry>>,
    /// Messages to or from this node id are dropped.
    down: Option<NodeId>,
}

impl Cluster {
    fn new(size: u64) -> Cluster {
        Cluster::with_config(size, |_| {})
    }

    /// As `new`, with `tune` applied to every node's config.
    fn with_config(size: u64, tune: impl Fn(&mut Config)) -> Cluster {
        let voters: Vec<NodeId> = (1..=size).collect();
        let cores = voters
            .iter()
            .map(|&id| {
                let mut config = Config::new(id, voters.clone());
                tune(&mut config);
                RaftCore::new(config, RestoredState::default())
            })
            .collect();
        Cluster {
            cores,
            applied: vec![Vec::new(); size as usize],
            down: None,
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
                if self
                    .down
                    .is_some_and(|id| id == message.to || id == message.from)
                {
                    continue;
                }
                self.cores[message.to as usize - 1].step(message);
            }
        }
        panic!("the cluster did not settle");
    }

    /// One exchange: every core with something to do runs a Ready, and the messages sent are
    /// delivered. Returns the read states released and the messages sent.
    fn exchange(&mut self) -> (Vec<ReadState>, Vec<Message>) {
        let mut released = Vec::new();
        let mut inbox = Vec::new();
        for core in &mut self.cores {
            if core.has_ready() {
                let ready = core.ready();
                released.extend(ready.read_states);
                inbox.extend(ready.messages);
                inbox.extend(ready.messages_unpersisted);
                core.advance();
            }
        }
        for message in &inbox {
            self.cores[message.to as usize - 1].step(message.clone());
        }
        (released, inbox)
    }

    /// Ticks every core `rounds` times, each followed by up to 50 rounds of Ready exchange
    /// (messages to or from a `down` node are delivered too), and shows every Ready to
    /// `watch` before it is carried out.
    fn tick_rounds(&mut self, rounds: usize, mut watch: impl FnMut(&Ready)) {
        for _ in 0..rounds {
            for core in &mut self.cores {
                core.tick();
            }
            for _ in 0..50 {
                let mut inbox = Vec::new();
                for core in &mut self.cores {
                    if core.has_ready() {
                        let ready = core.ready();
                        watch(&ready);
                        inbox.extend(ready.messages_unpersisted);
                        inbox.extend(ready.messages);
                        core.advance();
                    }
                }
                for message in inbox {
                    self.cores[message.to as usize - 1].step(message);
                }
            }
        }
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
    let leader_id = leader as NodeId + 1;
    for core in &cluster.cores {
        assert_eq!(
            core.leader(),
            leader_id,
            "node {} knows the leader",
            core.id()
        );
        assert_eq!(core.term(), cluster.cores[leader].term());
    }
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
    for core in &cluster.cores {
        let stored = core.entry(first).map(|e| e.data.as_slice());
        assert_eq!(
            stored,
            Some(&b"a"[..]),
            "node {} holds entry {first}",
            core.id()
        );
        assert_eq!(core.term_at(first), Some(cluster.cores[leader].term()));
    }
    // The leader's view of its followers: both, caught up and replicating.
    let last = cluster.cores[leader].status().last_index;
    let followers = cluster.cores[leader].followers();
    let ids: Vec<NodeId> = followers.iter().map(|f| f.id).collect();
    let expected: Vec<NodeId> = (1..=3).filter(|&id| id != leader_id).collect();
    assert_eq!(ids, expected);
    for follower in &followers {
        assert_eq!(follower.match_index, last, "follower {}", follower.id);
        assert_eq!(follower.state, "replicate", "follower {}", follower.id);
    }
    assert!(cluster.cores[(leader + 1) % 3].followers().is_empty());
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
        released.extend(cluster.exchange().0);
    }
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].context, 7);
    assert_eq!(released[0].index, cluster.cores[leader].status().commit);
}

/// Reads that arrive while a ReadIndex round is in flight start no round of their own: they
/// wait for it and share the next one, so a steady stream of reads costs one heartbeat round
/// per round trip, not one per Ready. They are released once their own round is confirmed,
/// and a round whose heartbeats were lost is confirmed by the periodic heartbeat.
#[test]
fn reads_during_a_round_in_flight_share_the_next_round() {
    let mut cluster = Cluster::new(3);
    let leader = cluster.tick_until_leader();
    cluster.cores[leader].read_index(1).unwrap();
    let first = cluster.cores[leader].ready();
    let first_round: Vec<Message> = first.messages_unpersisted;
    assert_eq!(first_round.len(), 2, "the first read starts a round");
    cluster.cores[leader].advance();
    // Two more reads while the first round is unanswered: no new heartbeats.
    cluster.cores[leader].read_index(2).unwrap();
    assert!(
        !cluster.cores[leader].has_ready(),
        "a read during a round in flight must not start another"
    );
    cluster.cores[leader].read_index(3).unwrap();
    // The first round's heartbeats are lost; the periodic heartbeat confirms it instead.
    drop(first_round);
    let mut released = Vec::new();
    let mut heartbeats = 0;
    for _ in 0..100 {
        for core in &mut cluster.cores {
            core.tick();
        }
        for _ in 0..20 {
            let (reads, sent) = cluster.exchange();
            released.extend(reads);
            heartbeats += sent
                .iter()
                .filter(|m| matches!(m.body, MessageBody::Heartbeat { .. }))
                .count();
        }
        if released.len() == 3 {
            break;
        }
    }
    let contexts: Vec<u64> = released.iter().map(|r| r.context).collect();
    assert_eq!(contexts, vec![1, 2, 3], "every read is released, in order");
    assert!(heartbeats >= 2, "the reads were confirmed by heartbeats");
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
    cluster.tick_rounds(20, |ready| snapshot_seen |= ready.snapshot.is_some());
    assert!(
        snapshot_seen,
        "the lagging follower must receive the snapshot"
    );
    let status = cluster.cores[lagging].status();
    assert!(status.snapshot_index >= applied, "{status:?}");
    assert_eq!(status.commit, cluster.cores[leader].status().commit);
}

/// Steps `message` into `core` and carries out the Ready; returns the
/// AppendEntries response it produced, as `(success, last_log_index)`.
fn append_response(core: &mut RaftCore, message: Message) -> (bool, u64) {
    core.step(message);
    let ready = core.ready();
    core.advance();
    ready
        .messages
        .into_iter()
        .find_map(|m| match m.body {
            MessageBody::AppendEntriesResponse {
                success,
                last_log_index,
                ..
            } => Some((success, last_log_index)),
            _ => None,
        })
        .expect("an AppendEntries response")
}

fn append_from_2(prev: (u64, u64), entries: &[(u64, u64)], leader_commit: u64) -> Message {
    Message {
        from: 2,
        to: 1,
        term: 5,
        body: MessageBody::AppendEntries {
            prev_log_index: prev.0,
            prev_log_term: prev.1,
            entries: entries
                .iter()
                .map(|&(index, term)| Entry {
                    kind: Default::default(),
                    term,
                    index,
                    data: Vec::new(),
                })
                .collect(),
            leader_commit,
        },
    }
}

/// Regression (wire abuse): entries whose terms fall below the entry they
/// follow, or rise above the sender's term, used to reach `RaftLog::append`
/// and panic ("append lowers the term") or make the log's last term exceed
/// the node's term. A follower must refuse them and keep its log.
#[test]
fn append_entries_with_impossible_terms_are_refused_not_panicked_on() {
    let mut core = RaftCore::new(Config::new(1, vec![1, 2, 3]), RestoredState::default());
    // A sane start: entries 1 and 2 of terms 3 and 4, both committed.
    assert_eq!(
        append_response(&mut core, append_from_2((0, 0), &[(1, 3), (2, 4)], 2)),
        (true, 2)
    );
    assert_eq!(core.status().commit, 2);
    // Entry 3 of term 1 after entry 2 of term 4.
    assert_eq!(
        append_response(&mut core, append_from_2((2, 4), &[(3, 1)], 2)),
        (false, 2)
    );
    // The same, reached through the skip over committed entries: the message
    // claims prev (0, 0) and re-sends 1 and 2 with term 1.
    assert_eq!(
        append_response(
            &mut core,
            append_from_2((0, 0), &[(1, 1), (2, 1), (3, 1)], 2)
        ),
        (false, 2)
    );
    // An entry of a term above the message's own (5).
    assert_eq!(
        append_response(&mut core, append_from_2((2, 4), &[(3, 9)], 2)),
        (false, 2)
    );
    // A prev_log_term above the message's term.
    assert_eq!(
        append_response(&mut core, append_from_2((2, 9), &[], 2)),
        (false, 2)
    );
    // Indexes that would overflow.
    assert_eq!(
        append_response(&mut core, append_from_2((u64::MAX, 4), &[(0, 5)], 2)),
        (false, 2)
    );
    // The log is intact, and a sane append still works.
    assert_eq!(core.term_at(2), Some(4));
    assert_eq!(
        append_response(&mut core, append_from_2((2, 4), &[(3, 5)], 3)),
        (true, 3)
    );
    assert_eq!(core.status().commit, 3);
}

/// Regression: a snapshot whose term is above the message's term used to be
/// installed; the node then refused every AppendEntries, and panicked at
/// the next start (the restored log's last term above the restored term)
/// or on becoming leader. It must be refused like impossible entries are.
#[test]
fn a_snapshot_of_a_term_above_the_senders_is_refused() {
    let restored = RestoredState {
        hard_state: HardState {
            term: 2,
            vote: 0,
            commit: 0,
        },
        ..RestoredState::default()
    };
    let mut core = RaftCore::new(Config::new(2, vec![1, 2, 3]), restored);
    let data = b"state".to_vec();
    core.step(Message {
        from: 1,
        to: 2,
        term: 2,
        body: MessageBody::InstallSnapshot {
            meta: SnapshotMeta { index: 10, term: 5 },
            membership: Default::default(),
            offset: 0,
            total_bytes: data.len() as u64,
            data,
            done: true,
        },
    });
    let ready = core.ready();
    core.advance();
    assert!(ready.snapshot.is_none(), "the snapshot was installed");
    assert!(core.snapshot().is_none());
    let refused = ready.messages.iter().any(|m| {
        matches!(
            m.body,
            MessageBody::InstallSnapshotResponse { success: false, .. }
        )
    });
    assert!(refused, "no refusal in {:?}", ready.messages);
    // The node still takes a sane append from the same leader.
    assert_eq!(
        append_response(
            &mut core,
            Message {
                term: 2,
                from: 1,
                to: 2,
                ..append_from_2((0, 0), &[(1, 2)], 1)
            }
        ),
        (true, 1)
    );
}

/// Regression: a follower whose whole log has terms above the one the leader
/// probes with answers the hint (0, 0); the leader used to fall back to the
/// follower's last index and back off one index per round trip. It must
/// probe from index 1 at once: here, one reject per differing term, not
/// one per entry.
#[test]
fn a_reject_hint_of_zero_probes_from_the_first_index() {
    let log = |term: u64, entries: &[(u64, u64)], vote: NodeId| RestoredState {
        hard_state: HardState {
            term,
            vote,
            commit: 0,
        },
        snapshot: None,
        entries: entries
            .iter()
            .map(|&(index, term)| Entry {
                kind: Default::default(),
                index,
                term,
                data: Vec::new(),
            })
            .collect(),
    };
    let old: Vec<(u64, u64)> = (1..=20).map(|i| (i, 2)).collect();
    let stale: Vec<(u64, u64)> = (1..=30).map(|i| (i, 3)).collect();
    let restored = vec![log(3, &old, 1), log(3, &stale, 2), log(3, &old, 1)];
    let voters = vec![1, 2, 3];
    let mut cluster = Cluster {
        cores: restored
            .into_iter()
            .enumerate()
            .map(|(k, r)| RaftCore::new(Config::new(k as u64 + 1, voters.clone()), r))
            .collect(),
        applied: vec![Vec::new(); 3],
        down: None,
    };
    // Only node 1 campaigns: node 3 votes for it, node 2 (more up to date)
    // does not, so node 1 leads and must overwrite node 2's 30 entries
    // (before the fix: one reject per index from 21 down to 1).
    let mut rejects = 0;
    for _ in 0..200 {
        cluster.cores[0].tick();
        for _ in 0..100 {
            let mut inbox = Vec::new();
            for core in cluster.cores.iter_mut() {
                if core.has_ready() {
                    let ready = core.ready();
                    inbox.extend(ready.messages_unpersisted);
                    inbox.extend(ready.messages);
                    core.advance();
                }
            }
            if inbox.is_empty() {
                break;
            }
            for message in inbox {
                let is_reject = matches!(
                    message.body,
                    MessageBody::AppendEntriesResponse { success: false, .. }
                );
                if message.from == 2 && is_reject {
                    rejects += 1;
                }
                cluster.cores[message.to as usize - 1].step(message);
            }
        }
        if cluster.cores[1].term_at(30).is_none() && cluster.cores[1].term_at(21).is_some() {
            break;
        }
    }
    assert_eq!(cluster.cores[0].role(), Role::Leader);
    assert_eq!(
        cluster.cores[1].term_at(1),
        Some(2),
        "node 2 was not caught up"
    );
    assert!(
        rejects <= 3,
        "node 2 rejected {rejects} probes before it matched"
    );
}

/// A configuration that breaks one of the core's invariants is refused at
/// construction, before it can elect or replicate anything.
/// A named way to break a core configuration.
type ConfigBreak = (&'static str, fn(&mut Config));

#[test]
fn a_config_breaking_an_invariant_is_refused() {
    let broken: [ConfigBreak; 7] = [
        ("node id 0", |c| c.id = NO_NODE),
        ("duplicate voters", |c| c.voters = vec![1, 2, 2]),
        ("voter id 0", |c| c.voters = vec![0, 1, 2]),
        ("no heartbeat interval", |c| c.heartbeat_interval_ticks = 0),
        ("heartbeat not below the election timeout", |c| {
            c.heartbeat_interval_ticks = c.election_timeout_min_ticks
        }),
        ("an empty election timeout range", |c| {
            c.election_timeout_max_ticks = c.election_timeout_min_ticks
        }),
        ("no snapshot chunk", |c| c.max_snapshot_chunk_bytes = 0),
    ];
    for (what, breaks) in broken {
        let mut config = Config::new(1, vec![1, 2, 3]);
        breaks(&mut config);
        let built = std::panic::catch_unwind(|| RaftCore::new(config, RestoredState::default()));
        assert!(built.is_err(), "a config with {what} was accepted");
    }
    for (inflight, append_bytes) in [(0, 1), (1, 0)] {
        let mut config = Config::new(1, vec![1, 2, 3]);
        config.max_inflight_appends = inflight;
        config.max_append_bytes = append_bytes;
        let built = std::panic::catch_unwind(|| RaftCore::new(config, RestoredState::default()));
        assert!(
            built.is_err(),
            "inflight {inflight}, append bytes {append_bytes} accepted"
        );
    }
    let fine = Config::new(1, vec![1, 2, 3]);
    assert!(std::panic::catch_unwind(|| RaftCore::new(fine, RestoredState::default())).is_ok());
}

/// With streamed snapshots the leader keeps the log after a follower that has just installed
/// one, so it catches up from the log, but only while that log stays within
/// `max_catch_up_log_bytes`; past that, the follower is left to another snapshot. A follower
/// that is merely behind is not waited for, and without streamed snapshots there is no floor
/// (the application's snapshot bytes fix the index).
#[test]
fn the_compaction_floor_waits_for_a_follower_catching_up_within_the_bound() {
    const ENTRY_BYTES: usize = 1_000;
    let mut cluster = Cluster::with_config(3, |config| {
        config.streamed_snapshots = true;
        config.max_catch_up_log_bytes = 50 * ENTRY_BYTES as u64;
    });
    let leader = cluster.tick_until_leader();
    let leader_id = leader as NodeId + 1;
    let lagging = (1..=3).find(|&id| id != leader_id).unwrap();
    cluster.down = Some(lagging);
    for _ in 0..10 {
        cluster.cores[leader].propose(vec![1; ENTRY_BYTES]).unwrap();
    }
    cluster.settle();
    assert_eq!(
        cluster.cores[leader].compaction_floor(),
        u64::MAX,
        "the floor waits for a follower that is merely behind"
    );
    // The leader compacts; the lagging follower needs a snapshot, which the driver streams
    // (the harness plays the driver: the follower reports it installed).
    let status = cluster.cores[leader].status();
    cluster.cores[leader].compact(status.applied, Vec::new());
    let meta = SnapshotMeta {
        index: status.applied,
        term: status.term,
    };
    cluster.down = None;
    let mut started = false;
    cluster.tick_rounds(20, |ready| {
        started |= ready.snapshot_sends.contains(&lagging)
    });
    assert!(started, "no snapshot started");
    cluster.down = Some(lagging);
    assert_eq!(cluster.cores[leader].compaction_floor(), meta.index);
    cluster.cores[leader].step(Message {
        from: lagging,
        to: leader_id,
        term: status.term,
        body: MessageBody::InstallSnapshotResponse {
            meta,
            next_offset: 0,
            success: true,
        },
    });
    for _ in 0..20 {
        cluster.cores[leader].propose(vec![2; ENTRY_BYTES]).unwrap();
    }
    cluster.settle();
    assert_eq!(
        cluster.cores[leader].compaction_floor(),
        meta.index,
        "the floor does not wait for the follower catching up 20 entries behind"
    );
    for _ in 0..60 {
        cluster.cores[leader].propose(vec![3; ENTRY_BYTES]).unwrap();
    }
    cluster.settle();
    assert_eq!(
        cluster.cores[leader].compaction_floor(),
        u64::MAX,
        "the floor still waits for a follower 80 entries behind, past the bound of 50"
    );

    let mut unstreamed = Cluster::new(3);
    let leader = unstreamed.tick_until_leader();
    unstreamed.down = Some((1..=3).find(|&id| id != leader as NodeId + 1).unwrap());
    unstreamed.cores[leader].propose(vec![1; 10]).unwrap();
    unstreamed.settle();
    assert_eq!(unstreamed.cores[leader].compaction_floor(), u64::MAX);
}
