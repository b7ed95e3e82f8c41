//! The operator's membership commands (`clerk member list|add|promote|remove`,
//! `clerk transfer-leader`), as a library so the binary only parses
//! arguments. Each change is one single-server change on the leader (see
//! `raft::membership`), answered once committed; `add` is the supported
//! path for a new voter: a learner first, promoted once its log is within
//! the leader's configured distance.

use std::fmt::Write as _;
use std::thread;
use std::time::{Duration, Instant};

use super::{Clerk, ClerkError};
use crate::proto::kvstore::{
    MemberChangeReply, MemberChangeRequest, MembersReply, MembersRequest, TransferLeaderRequest,
};

/// How often `add` looks at the learner's progress while it catches up.
const CATCH_UP_POLL_MS: u64 = 100;

/// One row of `member list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberRow {
    pub id: u64,
    pub address: String,
    pub voter: bool,
    pub is_leader: bool,
    /// The leader's last index minus the member's match index (leader's view).
    pub lag_entries: u64,
    pub match_index: u64,
}

/// The configuration as the leader (or, without one, some node) sees it.
#[derive(Clone, Debug)]
pub struct MemberList {
    pub leader: u64,
    pub term: u64,
    pub conf_index: u64,
    pub conf_committed: bool,
    pub members: Vec<MemberRow>,
}

impl MemberList {
    fn from_reply(reply: &MembersReply) -> MemberList {
        let members = reply
            .members
            .iter()
            .map(|m| MemberRow {
                id: m.id,
                address: m.address.clone(),
                voter: m.voter,
                is_leader: m.id == reply.leader,
                lag_entries: reply.last_index.saturating_sub(m.match_index),
                match_index: m.match_index,
            })
            .collect();
        MemberList {
            leader: reply.leader,
            term: reply.term,
            conf_index: reply.conf_index,
            conf_committed: reply.conf_committed,
            members,
        }
    }

    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<6} {:<22} {:<8} {:<7} {:>12} {:>10}\n",
            "ID", "ADDRESS", "ROLE", "LEADER", "MATCH", "LAG"
        );
        for m in &self.members {
            let _ = writeln!(
                out,
                "{:<6} {:<22} {:<8} {:<7} {:>12} {:>10}",
                m.id,
                if m.address.is_empty() {
                    "-"
                } else {
                    &m.address
                },
                if m.voter { "voter" } else { "learner" },
                if m.is_leader { "*" } else { "" },
                m.match_index,
                m.lag_entries
            );
        }
        let _ = write!(
            out,
            "term {}, configuration at log index {} ({})",
            self.term,
            self.conf_index,
            if self.conf_committed {
                "committed"
            } else {
                "not yet committed"
            }
        );
        out
    }

    pub fn json(&self) -> String {
        let members: Vec<String> = self
            .members
            .iter()
            .map(|m| {
                format!(
                    "{{\"id\":{},\"address\":{:?},\"role\":\"{}\",\"leader\":{},\"match_index\":{},\"lag\":{}}}",
                    m.id,
                    m.address,
                    if m.voter { "voter" } else { "learner" },
                    m.is_leader,
                    m.match_index,
                    m.lag_entries
                )
            })
            .collect();
        format!(
            "{{\"leader\":{},\"term\":{},\"conf_index\":{},\"conf_committed\":{},\"members\":[{}]}}",
            self.leader,
            self.term,
            self.conf_index,
            self.conf_committed,
            members.join(",")
        )
    }
}

impl Clerk {
    /// The membership as the leader sees it (with each member's lag), or as
    /// the first node that answers sees it when the leader cannot be asked.
    pub fn member_list(&mut self) -> Result<MemberList, ClerkError> {
        let request = MembersRequest {
            header: self.header(0),
            ..Default::default()
        };
        let reply = self.call_without_session(|stub| stub.members(&request))?;
        if reply.leader != 0 && reply.leader != reply.id {
            if let Some(node) = self.nodes.iter().find(|n| n.id == reply.leader) {
                if let Ok(leader_view) = node.stub.members(&request) {
                    if leader_view
                        .header
                        .as_ref()
                        .is_none_or(|h| h.error.value() == 0)
                    {
                        return Ok(MemberList::from_reply(&leader_view));
                    }
                }
            }
        }
        Ok(MemberList::from_reply(&reply))
    }

    fn member_change(
        &mut self,
        op: &str,
        id: u64,
        address: &str,
    ) -> Result<MemberChangeReply, ClerkError> {
        let request = MemberChangeRequest {
            header: self.header(0),
            op: op.to_string(),
            id,
            address: address.to_string(),
            ..Default::default()
        };
        self.call_without_session(|stub| stub.change_member(&request))
    }

    /// Adds node `id` at `address` as a learner; unless `learner_only`,
    /// waits until its log is within `max_lag_entries` of the leader's and
    /// promotes it. Returns a line per step done. Bounded by `timeout` in all.
    pub fn member_add(
        &mut self,
        id: u64,
        address: &str,
        learner_only: bool,
        max_lag_entries: u64,
        timeout: Duration,
    ) -> Result<Vec<String>, ClerkError> {
        let mut done = Vec::new();
        let reply = self.member_change("add-learner", id, address)?;
        done.push(format!(
            "added node {id} ({address}) as a learner at log index {}",
            reply.index
        ));
        if learner_only {
            return Ok(done);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let list = self.member_list()?;
            let progress = list
                .members
                .iter()
                .find(|m| m.id == id)
                .map(|m| (m.match_index, m.lag_entries));
            match progress {
                // It has answered, and is close enough (the leader checks too).
                Some((matched, lag)) if matched > 0 && lag <= max_lag_entries => break,
                Some(_) => {}
                None => {
                    return Err(ClerkError::Rejected(format!(
                        "node {id} is no longer a member"
                    )))
                }
            }
            if Instant::now() >= deadline {
                return Err(ClerkError::Timeout {
                    last_error: format!(
                        "learner {id} did not catch up within {} ms; it stays a learner \
                         (`clerk member promote {id}` once it has)",
                        timeout.as_millis()
                    ),
                });
            }
            thread::sleep(Duration::from_millis(CATCH_UP_POLL_MS));
        }
        let reply = self.member_change("promote", id, "")?;
        done.push(format!(
            "promoted node {id} to voter at log index {}",
            reply.index
        ));
        Ok(done)
    }

    pub fn member_promote(&mut self, id: u64) -> Result<String, ClerkError> {
        let reply = self.member_change("promote", id, "")?;
        Ok(format!(
            "promoted node {id} to voter at log index {}",
            reply.index
        ))
    }

    pub fn member_remove(&mut self, id: u64) -> Result<String, ClerkError> {
        let reply = self.member_change("remove", id, "")?;
        Ok(format!("removed node {id} at log index {}", reply.index))
    }

    /// Hands leadership to voter `id`; returns once it leads.
    pub fn transfer_leader(&mut self, id: u64) -> Result<String, ClerkError> {
        let request = TransferLeaderRequest {
            header: self.header(0),
            id,
            ..Default::default()
        };
        self.call_without_session(|stub| stub.transfer_leader(&request))?;
        Ok(format!("node {id} is the leader"))
    }
}

/// A membership command from the clerk's command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberCommand {
    List {
        json: bool,
    },
    Add {
        id: u64,
        address: String,
        learner: bool,
    },
    Promote {
        id: u64,
    },
    Remove {
        id: u64,
    },
    TransferLeader {
        id: u64,
    },
}

/// The words after `clerk`: `member list [--json]`, `member add ID IP:PORT
/// [--learner]`, `member promote ID`, `member remove ID`, `transfer-leader
/// ID`. `None` when the words are not a membership command at all.
pub fn parse_command(words: &[String]) -> Option<Result<MemberCommand, String>> {
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let id = |text: &str| -> Result<u64, String> {
        text.parse::<u64>()
            .ok()
            .filter(|&id| id != 0)
            .ok_or_else(|| format!("{text:?} is not a node id (a positive number)"))
    };
    Some(match words.as_slice() {
        ["transfer-leader", target] => id(target).map(|id| MemberCommand::TransferLeader { id }),
        ["transfer-leader", ..] => Err("transfer-leader takes ID".into()),
        ["member", "list"] => Ok(MemberCommand::List { json: false }),
        ["member", "list", "--json"] => Ok(MemberCommand::List { json: true }),
        ["member", "add", node, address, rest @ ..] => {
            let learner = match rest {
                [] => false,
                ["--learner"] => true,
                [other, ..] => {
                    return Some(Err(format!("member add: unexpected argument {other:?}")))
                }
            };
            match address.parse::<std::net::SocketAddr>() {
                Err(_) => Err(format!("member add: {address:?} is not an IP:PORT address")),
                Ok(_) => id(node).map(|id| MemberCommand::Add {
                    id,
                    address: address.to_string(),
                    learner,
                }),
            }
        }
        ["member", "promote", node] => id(node).map(|id| MemberCommand::Promote { id }),
        ["member", "remove", node] => id(node).map(|id| MemberCommand::Remove { id }),
        ["member", ..] => Err(
            "member takes list [--json] | add ID IP:PORT [--learner] | promote ID | remove ID"
                .into(),
        ),
        _ => return None,
    })
}

/// Runs `command` and returns what to print.
pub fn run_command(
    clerk: &mut Clerk,
    command: &MemberCommand,
    max_lag_entries: u64,
    timeout: Duration,
) -> Result<String, ClerkError> {
    match command {
        MemberCommand::List { json } => {
            let list = clerk.member_list()?;
            Ok(if *json { list.json() } else { list.table() })
        }
        MemberCommand::Add {
            id,
            address,
            learner,
        } => clerk
            .member_add(*id, address, *learner, max_lag_entries, timeout)
            .map(|lines| lines.join("\n")),
        MemberCommand::Promote { id } => clerk.member_promote(*id),
        MemberCommand::Remove { id } => clerk.member_remove(*id),
        MemberCommand::TransferLeader { id } => clerk.transfer_leader(*id),
    }
}

type PeerStub = crate::rpc::services::KvStoreStub<super::NodeChannel>;

/// A stub to `addr`, speaking with node `me`'s own credentials (cluster id,
/// node id, secret), so a node that cannot prove it belongs to the cluster
/// learns nothing and is refused as a peer later.
fn stub_to(config: &crate::config::ClusterConfig, me: u64, addr: std::net::SocketAddr) -> PeerStub {
    use crate::rpc::{ClientConfig, Credentials, RpcClient};
    let rpc_config = ClientConfig {
        connect_timeout_ms: 500,
        call_timeout_ms: 1_000,
        max_frame_bytes: config.max_frame_bytes,
    };
    let credentials = Credentials {
        cluster_id: config.cluster_id.clone(),
        node_id: me,
        secret: config.secret.clone(),
    };
    let channel: super::NodeChannel =
        Box::new(RpcClient::new(addr, rpc_config).with_credentials(credentials));
    crate::rpc::services::KvStoreStub::new(channel)
}

/// A stub to every other node of the file (see `stub_to`).
fn peer_stubs(
    config: &crate::config::ClusterConfig,
    me: u64,
) -> impl Iterator<Item = (u64, PeerStub)> + '_ {
    config
        .raft_nodes
        .iter()
        .filter(move |node| node.id != me)
        .map(move |node| (node.id, stub_to(config, me, node.addr())))
}

/// A node that starts with an empty data directory and not `--join` claims
/// to be a member of a cluster that has never started. If another node of
/// the file has a term or a log already, the cluster has started and this
/// node's disk was lost (or is someone else's): coming back under its old
/// id, with no memory of its votes and log, could elect two leaders in one
/// term. Returns the first such node (id, term), if any answers. When no
/// node answers (all are starting together), it is a first start.
pub fn started_cluster_peer(config: &crate::config::ClusterConfig, me: u64) -> Option<(u64, u64)> {
    let request = crate::proto::kvstore::StatusRequest {
        header: super::request_header(0, 0, config.client_token.as_deref()),
        ..Default::default()
    };
    peer_stubs(config, me).find_map(|(id, stub)| {
        let status = stub.status(&request).ok()?;
        let ok = status.header.as_ref().is_none_or(|h| h.error.value() == 0);
        (ok && (status.term > 0 || status.last_index > 0)).then_some((id, status.term))
    })
}

/// What the cluster says of the id a node `--join`s under, on an empty data
/// directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinCheck {
    /// The id is no member, or a learner the leader has sent nothing yet
    /// (`clerk member add` ran before this node started): it may join.
    New,
    /// Node `asked` lists the id as a voter, or (the leader) as a learner
    /// that has received part of the log: the joiner would take over a
    /// member's identity (its votes, the log the leader counts on) with an
    /// empty disk. `leader_view`: `asked` leads, so its match index is known.
    Member {
        asked: u64,
        voter: bool,
        match_index: u64,
        address: String,
    },
    /// No node of the file answered in `JOIN_CHECK_ROUNDS` rounds.
    NoAnswer,
    /// Only followers answered, listing the id as a learner: whether the
    /// leader has sent it entries cannot be told.
    NoLeader { asked: u64 },
}

/// How many times `join_check` asks the nodes of the file before it gives up,
/// and how long it waits between rounds (a leader election in between).
const JOIN_CHECK_ROUNDS: u32 = 5;
const JOIN_CHECK_RETRY_MS: u64 = 500;

/// Asks the cluster for the membership and looks for `me` in it. A `--join`
/// on an empty data directory under the id of a voter that was never
/// removed is the wiped-disk case `started_cluster_peer` refuses for a
/// bootstrap start: the leader would count the empty node's old match index
/// toward commit, and the node would vote again in terms it has voted in.
/// A learner is refused too once the leader has replicated to it (the
/// leader's match index for it is above 0: a promotion would trust it); a
/// learner the leader has never reached is the normal case of `clerk member
/// add` run before the new node is up (this check runs before it listens,
/// so the leader cannot have reached it since it started).
pub fn join_check(config: &crate::config::ClusterConfig, me: u64) -> JoinCheck {
    let request = MembersRequest {
        header: super::request_header(0, 0, config.client_token.as_deref()),
        ..Default::default()
    };
    let ask = |stub: &PeerStub| -> Option<MembersReply> {
        let reply = stub.members(&request).ok()?;
        let ok = reply.header.as_ref().is_none_or(|h| h.error.value() == 0);
        // A node with no configuration yet (itself joining) knows nothing.
        (ok && !reply.members.is_empty()).then_some(reply)
    };
    let mut learner_seen_by = None;
    for round in 0..JOIN_CHECK_ROUNDS {
        if round > 0 {
            thread::sleep(Duration::from_millis(JOIN_CHECK_RETRY_MS));
        }
        for (asked, stub) in peer_stubs(config, me) {
            let Some(mut reply) = ask(&stub) else {
                continue;
            };
            let mut asked = asked;
            // The leader's view holds the match indexes: ask it when this
            // node is a follower that knows it.
            if reply.leader != 0 && reply.leader != reply.id {
                let leader_addr = reply
                    .members
                    .iter()
                    .find(|m| m.id == reply.leader)
                    .and_then(|m| m.address.parse().ok())
                    .or_else(|| config.node(reply.leader).map(|n| n.addr()));
                let leader_view = leader_addr.and_then(|addr| ask(&stub_to(config, me, addr)));
                if let Some(view) = leader_view.filter(|v| v.leader == v.id) {
                    asked = view.id;
                    reply = view;
                }
            }
            let from_leader = reply.leader == reply.id;
            match reply.members.iter().find(|m| m.id == me) {
                None => return JoinCheck::New,
                Some(m) if m.voter || (from_leader && m.match_index > 0) => {
                    return JoinCheck::Member {
                        asked,
                        voter: m.voter,
                        match_index: m.match_index,
                        address: m.address.clone(),
                    }
                }
                Some(_) if from_leader => return JoinCheck::New,
                Some(_) => learner_seen_by = Some(asked),
            }
        }
    }
    match learner_seen_by {
        Some(asked) => JoinCheck::NoLeader { asked },
        None => JoinCheck::NoAnswer,
    }
}
