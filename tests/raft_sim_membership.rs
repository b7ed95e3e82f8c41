//! Membership changes and leadership transfer in the deterministic
//! simulation of the pure core: the named scenarios of issue 13 (add a node,
//! remove the leader, replace a crashed node, a change interrupted by a
//! leader crash, a partitioned removed node returning, transfer under load,
//! transfer to a lagging node). The random mix of all of them with the
//! usual faults is `soak_membership` in `raft_sim.rs`; the harness checks
//! the Raft safety properties and the membership invariants after every step.
//!
//! Time is logical: ET = election timeout in [10, 20) ticks, HB = 2 ticks.

mod sim;

use kvstore_raft::raft::{
    ConfChange, ConfChangeError, EntryKind, MessageBody, NodeId, ProposeError, Role,
};
use sim::{Sim, SimOptions, ET_MAX_TICKS, ET_MIN_TICKS};

/// `nodes` slots, of which `voters` bootstrap the cluster; the others wait
/// to be added, as `kvserver --join` does.
fn sim(nodes: u64, voters: &[NodeId], seed: u64, test: &str) -> Sim {
    let mut o = SimOptions::new(nodes, seed);
    o.voters = voters.to_vec();
    o.replay_hint = format!("cargo test --release --test raft_sim_membership {test}");
    Sim::new(o)
}

fn cmd(text: impl std::fmt::Display) -> Vec<u8> {
    text.to_string().into_bytes()
}

/// Waits until some leader has committed `index`.
fn wait_commit(s: &mut Sim, index: u64) {
    let done = s.run_until(30 * ET_MAX_TICKS, |s| {
        s.leader()
            .is_some_and(|l| s.core(l).status().commit >= index)
    });
    if done.is_none() {
        s.fail(&format!(
            "index {index} not committed\n{}",
            s.describe_nodes()
        ));
    }
}

/// Proposes `change` on the current leader, retrying while the protocol
/// says "not yet" (a change in flight, the leader's term not committed, the
/// learner behind), and waits until it commits. Returns its index.
fn change(s: &mut Sim, change: ConfChange) -> u64 {
    for _ in 0..30 * ET_MAX_TICKS {
        let leader = s.check_one_leader(30 * ET_MAX_TICKS);
        match s.conf_change(leader, change.clone()) {
            Ok(index) => {
                wait_commit(s, index);
                return index;
            }
            Err(
                ConfChangeError::ChangeInFlight { .. }
                | ConfChangeError::LeaderNotReady
                | ConfChangeError::LearnerBehind { .. }
                | ConfChangeError::NotLeader { .. }
                | ConfChangeError::TransferInProgress { .. },
            ) => s.tick(),
            Err(e) => s.fail(&format!("{change:?} refused: {e}")),
        }
    }
    s.fail(&format!("{change:?} never accepted"))
}

/// Adds `id` the supported way: as a learner, then promoted once caught up.
fn add_voter(s: &mut Sim, id: NodeId) {
    let address = format!("sim-{id}");
    change(s, ConfChange::AddLearner { id, address });
    change(s, ConfChange::Promote { id });
}

fn voters(s: &Sim, id: NodeId) -> Vec<NodeId> {
    s.membership(id).voters.keys().copied().collect()
}

/// Every running node that is a member agrees on the configuration.
fn check_agreement(s: &mut Sim, expected_voters: &[NodeId]) {
    let ok = s.run_until(30 * ET_MAX_TICKS, |s| {
        expected_voters
            .iter()
            .filter(|&&id| s.is_up(id))
            .all(|&id| voters(s, id) == expected_voters)
    });
    if ok.is_none() {
        let seen: Vec<(NodeId, Vec<NodeId>)> = s
            .up_ids()
            .into_iter()
            .map(|id| (id, voters(s, id)))
            .collect();
        s.fail(&format!(
            "members do not agree on voters {expected_voters:?}: {seen:?}"
        ));
    }
}

#[test]
fn add_node_grows_three_to_five() {
    let mut s = sim(5, &[1, 2, 3], 1, "add_node_grows_three_to_five");
    for k in 0..10 {
        s.one(cmd(format!("before-{k}")), 3, true);
    }
    // The nodes waiting to join have no configuration and never campaign.
    s.ensure(voters(&s, 4).is_empty() && s.status(4).term == 0, || {
        "a node waiting to join campaigned".into()
    });
    add_voter(&mut s, 4);
    add_voter(&mut s, 5);
    check_agreement(&mut s, &[1, 2, 3, 4, 5]);
    // Five voters: any two may fail, including two of the original three.
    let leader = s.check_one_leader(30 * ET_MAX_TICKS);
    let down: Vec<NodeId> = [1, 2, 3].into_iter().filter(|&id| id != leader).collect();
    for &id in &down {
        s.crash(id);
    }
    s.one(cmd("after"), 3, true);
    s.check_full();
}

#[test]
fn a_learner_counts_for_neither_commit_nor_votes() {
    let mut s = sim(
        4,
        &[1, 2, 3],
        2,
        "a_learner_counts_for_neither_commit_nor_votes",
    );
    s.one(cmd("x"), 3, true);
    change(
        &mut s,
        ConfChange::AddLearner {
            id: 4,
            address: "sim-4".into(),
        },
    );
    s.one(cmd("y"), 4, true);
    let leader = s.check_one_leader(30 * ET_MAX_TICKS);
    for id in [1, 2, 3].into_iter().filter(|&id| id != leader) {
        s.crash(id);
    }
    // Leader + learner are two of four nodes but one of three voters:
    // nothing commits, and the learner never campaigns.
    let index = s.propose(leader, cmd("stuck")).expect("still leader");
    s.run(10 * ET_MAX_TICKS);
    s.ensure(s.max_committed() < index, || {
        "an entry committed with a learner's copy counted".into()
    });
    s.ensure(
        s.status(4).role == Role::Follower && s.leaders().iter().all(|&(l, _)| l != 4),
        || "the learner campaigned".into(),
    );
    s.restart_down();
    wait_commit(&mut s, index);
    s.check_full();
}

#[test]
fn remove_the_leader() {
    let mut s = sim(3, &[1, 2, 3], 3, "remove_the_leader");
    for k in 0..5 {
        s.one(cmd(k), 3, true);
    }
    let old = s.check_one_leader(30 * ET_MAX_TICKS);
    let index = s
        .conf_change(old, ConfChange::Remove { id: old })
        .unwrap_or_else(|e| panic!("remove refused: {e}"));
    // The old leader manages the change without counting itself, steps down
    // once it commits, and hands over at once (TimeoutNow): a new leader
    // within one election timeout, not after one.
    let start = s.now_ticks;
    let handed = s.run_until(ET_MIN_TICKS, |s| {
        s.leader().is_some_and(|l| l != old) && s.status(old).role != Role::Leader
    });
    s.ensure(handed.is_some(), || {
        format!(
            "no new leader within {ET_MIN_TICKS} ticks of removing leader {old}\n{}",
            s.describe_nodes()
        )
    });
    s.ensure(s.max_committed() >= index, || {
        "the removal did not commit".into()
    });
    let rest: Vec<NodeId> = [1, 2, 3].into_iter().filter(|&id| id != old).collect();
    check_agreement(&mut s, &rest);
    s.one(cmd("after"), 2, true);
    // The removed node is still running: it never leads again.
    s.run(20 * ET_MAX_TICKS);
    s.ensure(s.leaders().iter().all(|&(l, _)| l != old), || {
        format!("removed node {old} leads again")
    });
    s.ensure(!voters(&s, old).contains(&old), || {
        "the removed node still counts itself a voter".into()
    });
    let _ = start;
    s.check_full();
}

#[test]
fn replace_a_crashed_node() {
    let mut s = sim(4, &[1, 2, 3], 4, "replace_a_crashed_node");
    for k in 0..10 {
        s.one(cmd(k), 3, true);
    }
    let leader = s.check_one_leader(30 * ET_MAX_TICKS);
    let dead = [1, 2, 3]
        .into_iter()
        .find(|&id| id != leader)
        .expect("a follower");
    // Its disk is gone: it may only come back as a new member.
    s.wipe(dead);
    s.one(cmd("degraded"), 2, true);
    change(&mut s, ConfChange::Remove { id: dead });
    add_voter(&mut s, 4);
    let expected: Vec<NodeId> = [1, 2, 3, 4].into_iter().filter(|&id| id != dead).collect();
    check_agreement(&mut s, &expected);
    // Three voters again: one more may fail.
    let leader = s.check_one_leader(30 * ET_MAX_TICKS);
    let other = expected
        .iter()
        .copied()
        .find(|&id| id != leader && id != 4)
        .expect("another voter");
    s.crash(other);
    s.one(cmd("after"), 2, true);
    s.check_full();
}

#[test]
fn a_change_interrupted_by_a_leader_crash() {
    let mut s = sim(4, &[1, 2, 3], 5, "a_change_interrupted_by_a_leader_crash");
    s.one(cmd("x"), 3, true);
    change(
        &mut s,
        ConfChange::AddLearner {
            id: 4,
            address: "sim-4".into(),
        },
    );
    s.one(cmd("y"), 4, true);
    let old = s.check_one_leader(30 * ET_MAX_TICKS);
    // The promotion reaches no one: the leader's appends are lost.
    s.drop_filter = Some(Box::new(move |m| {
        m.from == old && matches!(m.body, MessageBody::AppendEntries { .. })
    }));
    let index = s
        .conf_change(old, ConfChange::Promote { id: 4 })
        .unwrap_or_else(|e| panic!("promote refused: {e}"));
    s.ensure(voters(&s, old).contains(&4), || {
        "the change is not in force on the leader once appended".into()
    });
    s.crash(old);
    s.drop_filter = None;
    let new = s.check_one_leader(30 * ET_MAX_TICKS);
    s.ensure(new != old && !voters(&s, new).contains(&4), || {
        "the new leader should not have the lost promotion".into()
    });
    // The old leader returns: its uncommitted promotion is overwritten and
    // it falls back to the configuration before it.
    s.restart(old);
    s.one(cmd("z"), 4, true);
    s.ensure(
        !voters(&s, old).contains(&4)
            && s.core(old).entry(index).map(|e| e.kind) != Some(EntryKind::ConfChange),
        || "the old leader kept its overwritten promotion".into(),
    );
    check_agreement(&mut s, &[1, 2, 3]);
    // The change can be made again, by the new leader.
    change(&mut s, ConfChange::Promote { id: 4 });
    check_agreement(&mut s, &[1, 2, 3, 4]);
    s.check_full();
}

#[test]
fn a_new_leader_changes_nothing_before_committing_in_its_term() {
    let mut s = sim(
        4,
        &[1, 2, 3],
        6,
        "a_new_leader_changes_nothing_before_committing_in_its_term",
    );
    s.one(cmd("x"), 3, true);
    let old = s.check_one_leader(30 * ET_MAX_TICKS);
    // Followers' acknowledgements are lost, so the next leader cannot
    // commit its no-op: it must refuse a change (Ongaro's 2015 fix).
    s.crash(old);
    s.drop_filter = Some(Box::new(|m| {
        matches!(m.body, MessageBody::AppendEntriesResponse { .. })
    }));
    let new = s.check_one_leader(30 * ET_MAX_TICKS);
    let refused = s.conf_change(
        new,
        ConfChange::AddLearner {
            id: 4,
            address: "sim-4".into(),
        },
    );
    s.ensure(refused == Err(ConfChangeError::LeaderNotReady), || {
        format!("a leader with nothing committed in its term accepted a change: {refused:?}")
    });
    s.drop_filter = None;
    s.restart(old);
    s.one(cmd("y"), 3, true);
}

#[test]
fn one_change_at_a_time_and_bad_changes_are_refused() {
    let mut s = sim(
        5,
        &[1, 2, 3],
        7,
        "one_change_at_a_time_and_bad_changes_are_refused",
    );
    s.one(cmd("x"), 3, true);
    let leader = s.check_one_leader(30 * ET_MAX_TICKS);
    // Hold the first change uncommitted by losing the followers' answers.
    s.drop_filter = Some(Box::new(|m| {
        matches!(m.body, MessageBody::AppendEntriesResponse { .. })
    }));
    let first = s
        .conf_change(
            leader,
            ConfChange::AddLearner {
                id: 4,
                address: "sim-4".into(),
            },
        )
        .expect("first change");
    let second = s.conf_change(
        leader,
        ConfChange::AddLearner {
            id: 5,
            address: "sim-5".into(),
        },
    );
    s.ensure(
        second == Err(ConfChangeError::ChangeInFlight { index: first }),
        || format!("a second change while one is in flight: {second:?}"),
    );
    s.drop_filter = None;
    wait_commit(&mut s, first);
    let refusals = [
        (
            ConfChange::Remove { id: 9 },
            ConfChangeError::UnknownMember { id: 9 },
        ),
        (
            ConfChange::Promote { id: 1 },
            ConfChangeError::NotLearner { id: 1 },
        ),
        (
            ConfChange::AddLearner {
                id: 5,
                address: "sim-4".into(),
            },
            ConfChangeError::AddressInUse {
                address: "sim-4".into(),
                by: 4,
            },
        ),
        (
            ConfChange::AddLearner {
                id: 2,
                address: "elsewhere".into(),
            },
            ConfChangeError::AlreadyMember { id: 2 },
        ),
    ];
    for (request, expected) in refusals {
        let leader = s.check_one_leader(30 * ET_MAX_TICKS);
        let got = s.conf_change(leader, request.clone());
        s.ensure(got == Err(expected.clone()), || {
            format!("{request:?}: expected {expected:?}, got {got:?}")
        });
    }
}

/// A removed node, cut off while it was removed, comes back with its old
/// configuration and campaigns: the cluster keeps its leader and its term.
/// Shown with pre-vote (the node's term does not even move) and without it
/// (its term races ahead, and the leader lease of check-quorum ignores it).
#[test]
fn a_partitioned_removed_node_returning_does_not_disturb() {
    for pre_vote in [true, false] {
        let test = "a_partitioned_removed_node_returning_does_not_disturb";
        let mut o = SimOptions::new(4, 8);
        o.pre_vote = pre_vote;
        o.replay_hint = format!("cargo test --release --test raft_sim_membership {test}");
        let mut s = Sim::new(o);
        s.one(cmd("x"), 4, true);
        let leader = s.check_one_leader(30 * ET_MAX_TICKS);
        let gone = [1, 2, 3, 4]
            .into_iter()
            .find(|&id| id != leader)
            .expect("follower");
        s.isolate(gone);
        change(&mut s, ConfChange::Remove { id: gone });
        s.ensure(voters(&s, gone).contains(&gone), || {
            "the isolated node should not know it was removed".into()
        });
        s.run(20 * ET_MAX_TICKS);
        let leader = s.check_one_leader(30 * ET_MAX_TICKS);
        let term = s.status(leader).term;
        s.heal_partitions();
        s.heal_network();
        for k in 0..20 {
            s.run(ET_MAX_TICKS);
            if k % 4 == 0 {
                s.one(cmd(format!("during-{k}")), 3, true);
            }
        }
        s.ensure(
            s.leader() == Some(leader) && s.status(leader).term == term,
            || {
                format!(
                    "pre_vote {pre_vote}: removed node {gone} disturbed the cluster (leader {leader} \
                     term {term} before)\n{}",
                    s.describe_nodes()
                )
            },
        );
        s.ensure(s.leaders().iter().all(|&(l, _)| l != gone), || {
            format!("removed node {gone} became leader")
        });
        s.check_full();
    }
}

/// Proposes one command per tick on whoever leads, as clients would.
fn propose_load(s: &mut Sim, k: u64) -> Result<u64, ProposeError> {
    match s.leader() {
        Some(leader) => s.propose(leader, cmd(format!("load-{k}"))),
        None => Err(ProposeError::NotLeader { hint: 0 }),
    }
}

#[test]
fn transfer_leadership_under_load() {
    let mut s = sim(3, &[1, 2, 3], 9, "transfer_leadership_under_load");
    s.one(cmd("x"), 3, true);
    let old = s.check_one_leader(30 * ET_MAX_TICKS);
    let target = [1, 2, 3]
        .into_iter()
        .find(|&id| id != old)
        .expect("follower");
    for k in 0..50 {
        let _ = propose_load(&mut s, k);
        s.tick();
    }
    s.transfer_leader(old, target).expect("transfer accepted");
    // While it is under way, the old leader takes no proposals and points
    // clients at the target.
    let refused = s.propose(old, cmd("during"));
    s.ensure(
        refused == Err(ProposeError::NotLeader { hint: target }) || s.leader() == Some(target),
        || format!("a proposal during the transfer: {refused:?}"),
    );
    let mut last_commit = s.max_committed();
    let mut longest_gap_ticks = 0;
    let mut gap_ticks = 0;
    for k in 50..150 {
        let _ = propose_load(&mut s, k);
        s.tick();
        if s.max_committed() > last_commit {
            last_commit = s.max_committed();
            gap_ticks = 0;
        } else {
            gap_ticks += 1;
            longest_gap_ticks = longest_gap_ticks.max(gap_ticks);
        }
    }
    s.ensure(s.leader() == Some(target), || {
        format!("leader is {:?}, not the target {target}", s.leader())
    });
    // An election would leave commit still for at least ET_MIN ticks.
    s.ensure(longest_gap_ticks < ET_MIN_TICKS / 2, || {
        format!("commit stood still for {longest_gap_ticks} ticks during the transfer")
    });
    s.check_full();
}

#[test]
fn transfer_to_a_lagging_node() {
    let mut s = sim(3, &[1, 2, 3], 10, "transfer_to_a_lagging_node");
    s.one(cmd("x"), 3, true);
    let leader = s.check_one_leader(30 * ET_MAX_TICKS);
    let target = [1, 2, 3]
        .into_iter()
        .find(|&id| id != leader)
        .expect("follower");
    s.disconnect(target);
    for k in 0..40 {
        s.one(cmd(format!("behind-{k}")), 2, true);
    }
    s.connect(target);
    s.ensure(
        s.status(target).last_index < s.status(leader).last_index,
        || "the target should be behind".into(),
    );
    s.transfer_leader(leader, target)
        .expect("transfer accepted");
    let done = s.run_until(ET_MIN_TICKS, |s| s.leader() == Some(target));
    s.ensure(done.is_some(), || {
        format!(
            "the lagging target did not take over\n{}",
            s.describe_nodes()
        )
    });
    s.one(cmd("after"), 3, true);

    // A transfer to a node that cannot answer is abandoned after an
    // election timeout, and the leader takes proposals again.
    let leader = target;
    let unreachable = [1, 2, 3]
        .into_iter()
        .find(|&id| id != leader)
        .expect("follower");
    s.disconnect(unreachable);
    s.transfer_leader(leader, unreachable)
        .expect("transfer accepted");
    let held = s.propose(leader, cmd("held"));
    s.ensure(held.is_err(), || "proposals taken during a transfer".into());
    s.run(ET_MIN_TICKS + 1);
    s.ensure(
        s.status(leader).role == Role::Leader && s.status(leader).lead_transferee == 0,
        || "the transfer was not abandoned after an election timeout".into(),
    );
    let resumed = s.propose(leader, cmd("resumed"));
    s.ensure(resumed.is_ok(), || {
        "proposals refused after the transfer was abandoned".into()
    });
    s.connect(unreachable);
    s.one(cmd("end"), 3, true);
    s.check_full();
}

#[test]
fn snapshots_carry_the_membership_to_a_new_node() {
    let mut o = SimOptions::new(4, 11);
    o.voters = vec![1, 2, 3];
    o.snapshot_every_applies = 5;
    o.replay_hint = "cargo test --release --test raft_sim_membership snapshots_carry".into();
    let mut s = Sim::new(o);
    for k in 0..30 {
        s.one(cmd(k), 3, true);
    }
    add_voter(&mut s, 4);
    for k in 0..30 {
        s.one(cmd(format!("more-{k}")), 4, true);
    }
    // Node 4 got its log start from a snapshot: restarted from what it
    // stored, it still knows the configuration.
    s.restart(4);
    s.ensure(voters(&s, 4) == vec![1, 2, 3, 4], || {
        format!("restarted node 4 has voters {:?}", voters(&s, 4))
    });
    for id in [1, 2, 3] {
        s.restart(id);
    }
    check_agreement(&mut s, &[1, 2, 3, 4]);
    s.one(cmd("end"), 4, true);
    s.check_full();
}
