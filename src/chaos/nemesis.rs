//! The nemesis: turns a scheduled [`Fault`] into actions on the cluster
//! (signals, proxy settings, the fault file) and undoes them. It runs on the
//! runner's thread, the thread that started the nodes, since a restarted
//! node is tied to the thread that starts it (see `cluster`).

use std::fs;

use super::cluster::Cluster;
use super::proxy::DirectionFaults;
use super::proxy::PER_MILLION;
use super::schedule::{Fault, Target};
use crate::clerk::Clerk;

/// How long a paused node that was cut off stays cut off after SIGCONT:
/// longer than the two election timeouts a deposed leader may take to
/// notice (by check-quorum) that it no longer leads.
pub const STALE_LEADER_MS: u64 = 700;

/// What must be undone to end a fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Undo {
    Restart(u64),
    Resume(u64),
    /// SIGCONT, and heal the network `STALE_LEADER_MS` later.
    ResumeCutOff(u64),
    Network,
    DiskStall(u64),
    /// Start a new member in the (wiped) slot and add it.
    Rejoin(u64),
}

/// How long a membership command of the `membership` fault may take: a
/// removal, or an addition with the learner's catch-up.
const MEMBER_CHANGE_TIMEOUT_MS: u64 = 30_000;

/// Applies `fault`; returns how it was carried out (with the node a
/// "leader" target resolved to) and what undoes it.
pub fn apply(
    cluster: &mut Cluster,
    status: &Clerk,
    fault: &Fault,
) -> Result<(String, Undo), String> {
    let resolve = |cluster: &Cluster, target: &Target| resolve(status, cluster, target);
    let ids: Vec<u64> = (1..=cluster.size()).collect();
    let others = |id: u64| -> Vec<u64> { ids.iter().copied().filter(|&o| o != id).collect() };
    let (done, undo) = match fault {
        Fault::Kill { target } => {
            let (id, named) = resolve(cluster, target);
            cluster.kill(id);
            (format!("kill -9 node {id}{named}"), Undo::Restart(id))
        }
        Fault::Pause { target, cut_off } => {
            let (id, named) = resolve(cluster, target);
            cluster.set_paused(id, true)?;
            if *cut_off {
                cluster.partition(&[id], &others(id));
                let done = format!(
                    "SIGSTOP node {id}{named} and cut it off; SIGCONT while still cut off, \
                     reconnected {STALE_LEADER_MS} ms later"
                );
                (done, Undo::ResumeCutOff(id))
            } else {
                (format!("SIGSTOP node {id}{named}"), Undo::Resume(id))
            }
        }
        Fault::Isolate { target } => {
            let (id, named) = resolve(cluster, target);
            cluster.partition(&[id], &others(id));
            (format!("isolate node {id}{named}"), Undo::Network)
        }
        Fault::Split { minority, majority } => {
            cluster.partition(minority, majority);
            (fault.to_string(), Undo::Network)
        }
        Fault::Bridge { left, right, .. } => {
            cluster.partition(left, right);
            (fault.to_string(), Undo::Network)
        }
        Fault::OneWay { target, outgoing } => {
            let (id, named) = resolve(cluster, target);
            let lost = DirectionFaults {
                black_hole: true,
                ..DirectionFaults::default()
            };
            for other in others(id) {
                let (from, to) = if *outgoing { (id, other) } else { (other, id) };
                cluster.set_flow(from, to, lost);
            }
            let way = if *outgoing { "from" } else { "to" };
            (
                format!("one-way loss: messages {way} node {id}{named} lost"),
                Undo::Network,
            )
        }
        Fault::Delay { delay_ms } => {
            set_every_flow(cluster, |faults| faults.delay_ms = *delay_ms);
            (fault.to_string(), Undo::Network)
        }
        Fault::Drop { percent } => {
            let per_million = percent * (PER_MILLION / 100);
            set_every_flow(cluster, |faults| faults.drop_per_million = per_million);
            (fault.to_string(), Undo::Network)
        }
        Fault::DiskStall { target } => {
            let (id, named) = resolve(cluster, target);
            let path = cluster.fault_file(id);
            fs::write(&path, "stall\n")
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            (
                format!("stall the fsyncs of node {id}{named}"),
                Undo::DiskStall(id),
            )
        }
        Fault::Membership { target } => {
            let (slot, named) = resolve(cluster, target);
            let old = cluster.member_id(slot);
            let removed = admin_clerk(cluster)
                .member_remove(old)
                .map_err(|e| format!("clerk member remove {old}: {e}"))?;
            cluster.kill_and_wipe(slot)?;
            (
                format!(
                    "membership: node {old}{named} removed ({removed}), killed, its data \
                     directory wiped; it rejoins under a new id at the end"
                ),
                Undo::Rejoin(slot),
            )
        }
    };
    Ok((done, undo))
}

/// Ends a fault.
pub fn undo(cluster: &mut Cluster, undo: &Undo) -> Result<(), String> {
    match undo {
        Undo::Restart(id) => cluster.start_node(*id),
        Undo::Resume(id) => cluster.set_paused(*id, false),
        Undo::ResumeCutOff(id) => {
            cluster.set_paused(*id, false)?;
            std::thread::sleep(std::time::Duration::from_millis(STALE_LEADER_MS));
            cluster.heal_network();
            Ok(())
        }
        Undo::Network => {
            cluster.heal_network();
            Ok(())
        }
        Undo::DiskStall(id) => {
            let path = cluster.fault_file(*id);
            fs::write(&path, "").map_err(|e| format!("cannot write {}: {e}", path.display()))
        }
        Undo::Rejoin(slot) => {
            let id = cluster.start_new_member(*slot)?;
            let addr = cluster.real_addr(*slot)?.to_string();
            admin_clerk(cluster)
                .member_add(
                    id,
                    &addr,
                    false,
                    crate::kv::server::PROMOTE_MAX_LAG_ENTRIES,
                    std::time::Duration::from_millis(MEMBER_CHANGE_TIMEOUT_MS),
                )
                .map(drop)
                .map_err(|e| format!("clerk member add {id} {addr}: {e}"))
        }
    }
}

/// A clerk for the membership commands, over the clients' cluster file.
fn admin_clerk(cluster: &Cluster) -> Clerk {
    Clerk::new(
        cluster.client_config(),
        super::workload::clerk_options(0, MEMBER_CHANGE_TIMEOUT_MS),
    )
}

fn set_every_flow(cluster: &Cluster, set: impl Fn(&mut DirectionFaults)) {
    let mut faults = DirectionFaults::default();
    set(&mut faults);
    for (from, to) in cluster.links() {
        cluster.set_flow(from, to, faults);
    }
}

/// The slot a target names now, and " (the leader)" when it was aimed at
/// the leader and one was found.
fn resolve(status: &Clerk, cluster: &Cluster, target: &Target) -> (u64, &'static str) {
    match *target {
        Target::Node(slot) => (slot, ""),
        Target::Leader { fallback } => {
            match current_leader(status).and_then(|id| cluster.slot_of(id)) {
                Some(slot) => (slot, " (the leader)"),
                None => (fallback, " (no leader found)"),
            }
        }
    }
}

/// The node that says it leads at the highest term, if any answers.
pub fn current_leader(status: &Clerk) -> Option<u64> {
    status
        .status_all()
        .into_iter()
        .filter_map(|view| view.status.ok())
        .filter(|reply| reply.role == "leader")
        .max_by_key(|reply| reply.term)
        .map(|reply| reply.id)
}
