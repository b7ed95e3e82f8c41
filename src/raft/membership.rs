//! Who is in the cluster: the voters and learners, with the address each
//! listens on. Membership is replicated state: it changes only through
//! conf-change log entries and travels in snapshots.
//!
//! # The protocol: single-server changes, effective when appended
//!
//! A conf-change entry carries the whole configuration that results from the
//! change (not a delta), so a node takes it as is. Every node uses the latest
//! configuration in its log, committed or not (Raft thesis §4.1): a leader
//! counts the new majority for the very entry that introduces it, and a
//! follower whose uncommitted change is truncated falls back to the one
//! before. We chose single-server changes over joint consensus because each
//! change moves one member, which is what the operator's commands do (add a
//! learner, promote it, remove a member), and the two majorities of any two
//! configurations that differ by one voter always overlap. Two rules close
//! the known gaps:
//!
//! - One change at a time: a leader refuses a change while an earlier one is
//!   in its log uncommitted, so two configurations in flight never differ by
//!   more than one voter.
//! - A leader first commits an entry of its own term before it proposes a
//!   change (Ongaro, raft-dev 2015): without it, a leader elected under an
//!   old configuration could append a change that conflicts with an
//!   uncommitted change of a previous term, and the two majorities need not
//!   overlap.
//!
//! Learners receive the log and snapshots but never count for commit or
//! elections; a new voter enters as a learner and is promoted once it has
//! caught up, so a slow new node never costs the cluster its quorum.

use std::collections::BTreeMap;

use super::types::NodeId;

/// One configuration of the cluster. Invariant: no id is both a voter and a
/// learner, and id 0 is never a member.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Membership {
    /// Voter id -> the address it listens on (`IP:PORT`; empty when unknown,
    /// as in the simulation).
    pub voters: BTreeMap<NodeId, String>,
    pub learners: BTreeMap<NodeId, String>,
}

/// One single-server change, as the operator asks for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfChange {
    /// A new non-voting member that starts receiving the log.
    AddLearner { id: NodeId, address: String },
    /// A learner becomes a voter.
    Promote { id: NodeId },
    /// A voter or learner leaves.
    Remove { id: NodeId },
}

/// Why a change is refused. Every refusal names what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfChangeError {
    NotLeader {
        hint: NodeId,
    },
    /// The leader has not yet committed an entry of its term.
    LeaderNotReady,
    /// An earlier change is in the log, not yet committed.
    ChangeInFlight {
        index: u64,
    },
    /// A leadership transfer is under way: no proposals until it ends.
    TransferInProgress {
        to: NodeId,
    },
    AlreadyMember {
        id: NodeId,
    },
    AddressInUse {
        address: String,
        by: NodeId,
    },
    UnknownMember {
        id: NodeId,
    },
    NotLearner {
        id: NodeId,
    },
    /// Leadership goes only to a voter.
    NotVoter {
        id: NodeId,
    },
    /// The learner's log is further behind the leader's than allowed.
    LearnerBehind {
        id: NodeId,
        lag_entries: u64,
    },
    /// The change would leave no voter.
    LastVoter {
        id: NodeId,
    },
    InvalidId,
}

impl std::fmt::Display for ConfChangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfChangeError::NotLeader { hint } => write!(f, "not the leader (leader: {hint})"),
            ConfChangeError::LeaderNotReady => {
                write!(
                    f,
                    "the leader has not committed an entry of its term yet; retry"
                )
            }
            ConfChangeError::ChangeInFlight { index } => write!(
                f,
                "another membership change (log index {index}) is not committed yet"
            ),
            ConfChangeError::TransferInProgress { to } => {
                write!(f, "a leadership transfer to node {to} is under way")
            }
            ConfChangeError::AlreadyMember { id } => write!(f, "node {id} is already a member"),
            ConfChangeError::AddressInUse { address, by } => {
                write!(f, "address {address} is already used by node {by}")
            }
            ConfChangeError::UnknownMember { id } => write!(f, "node {id} is not a member"),
            ConfChangeError::NotLearner { id } => write!(f, "node {id} is not a learner"),
            ConfChangeError::NotVoter { id } => write!(f, "node {id} is not a voter"),
            ConfChangeError::LearnerBehind { id, lag_entries } => write!(
                f,
                "learner {id} is {lag_entries} entries behind the leader; wait for it to catch up"
            ),
            ConfChangeError::LastVoter { id } => {
                write!(f, "node {id} is the last voter; the cluster needs one")
            }
            ConfChangeError::InvalidId => write!(f, "node id 0 is reserved"),
        }
    }
}

impl Membership {
    /// A configuration of `voters` with unknown addresses.
    pub fn with_voters(voters: impl IntoIterator<Item = NodeId>) -> Membership {
        Membership {
            voters: voters.into_iter().map(|id| (id, String::new())).collect(),
            learners: BTreeMap::new(),
        }
    }

    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains_key(&id)
    }

    pub fn is_learner(&self, id: NodeId) -> bool {
        self.learners.contains_key(&id)
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.is_voter(id) || self.is_learner(id)
    }

    pub fn address(&self, id: NodeId) -> Option<&str> {
        self.voters
            .get(&id)
            .or_else(|| self.learners.get(&id))
            .map(String::as_str)
    }

    /// Every member, voters then learners.
    pub fn members(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.voters.keys().chain(self.learners.keys()).copied()
    }

    /// The votes (or stored copies) that make a majority of the voters.
    pub fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    /// The configuration `change` leads to, or why it is refused. Checks only
    /// the configuration itself; the leader checks the rest (one change at a
    /// time, its own term committed, the learner caught up).
    pub fn apply(&self, change: &ConfChange) -> Result<Membership, ConfChangeError> {
        let mut next = self.clone();
        match change {
            ConfChange::AddLearner { id, address } => {
                if *id == 0 {
                    return Err(ConfChangeError::InvalidId);
                }
                if self.contains(*id) {
                    return Err(ConfChangeError::AlreadyMember { id: *id });
                }
                if !address.is_empty() {
                    if let Some(by) = self
                        .members()
                        .find(|&m| self.address(m) == Some(address.as_str()))
                    {
                        return Err(ConfChangeError::AddressInUse {
                            address: address.clone(),
                            by,
                        });
                    }
                }
                next.learners.insert(*id, address.clone());
            }
            ConfChange::Promote { id } => {
                let address = match next.learners.remove(id) {
                    Some(address) => address,
                    None if self.is_voter(*id) => {
                        return Err(ConfChangeError::NotLearner { id: *id })
                    }
                    None => return Err(ConfChangeError::UnknownMember { id: *id }),
                };
                next.voters.insert(*id, address);
            }
            ConfChange::Remove { id } => {
                if next.learners.remove(id).is_none() {
                    if next.voters.remove(id).is_none() {
                        return Err(ConfChangeError::UnknownMember { id: *id });
                    }
                    if next.voters.is_empty() {
                        return Err(ConfChangeError::LastVoter { id: *id });
                    }
                }
            }
        }
        Ok(next)
    }

    /// The bytes of a conf-change entry: a format of the core's own, so the
    /// core needs no wire library. Layout: `[voters][learners]`, each a u32
    /// count then, per member, `[u64 id][u32 length][address bytes]`, little
    /// endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for group in [&self.voters, &self.learners] {
            out.extend_from_slice(&(group.len() as u32).to_le_bytes());
            for (id, address) in group {
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&(address.len() as u32).to_le_bytes());
                out.extend_from_slice(address.as_bytes());
            }
        }
        out
    }

    /// Decodes [`Self::encode`]'s bytes; `None` when they are malformed (the
    /// bytes come from the network, so this never panics).
    pub fn decode(bytes: &[u8]) -> Option<Membership> {
        let mut rest = bytes;
        let mut take = |n: usize| -> Option<&[u8]> {
            if rest.len() < n {
                return None;
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Some(head)
        };
        let mut groups = [BTreeMap::new(), BTreeMap::new()];
        for group in groups.iter_mut() {
            let count = u32::from_le_bytes(take(4)?.try_into().ok()?);
            for _ in 0..count {
                let id = u64::from_le_bytes(take(8)?.try_into().ok()?);
                let length = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
                let address = std::str::from_utf8(take(length)?).ok()?.to_string();
                if id == 0 || group.insert(id, address).is_some() {
                    return None;
                }
            }
        }
        if take(1).is_some() {
            return None;
        }
        let [voters, learners] = groups;
        let membership = Membership { voters, learners };
        if membership
            .voters
            .keys()
            .any(|id| membership.is_learner(*id))
        {
            return None;
        }
        Some(membership)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_round_trips_and_garbage_is_refused() {
        let mut m = Membership::with_voters([1, 2]);
        m.learners.insert(7, "127.0.0.1:9".into());
        assert_eq!(Membership::decode(&m.encode()), Some(m.clone()));
        let bytes = m.encode();
        for cut in 0..bytes.len() {
            assert_eq!(Membership::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Membership::decode(&longer), None);
    }

    #[test]
    fn apply_refuses_bad_changes_with_a_reason() {
        let m = Membership::with_voters([1]);
        assert_eq!(
            m.apply(&ConfChange::Remove { id: 1 }),
            Err(ConfChangeError::LastVoter { id: 1 })
        );
        assert_eq!(
            m.apply(&ConfChange::Promote { id: 1 }),
            Err(ConfChangeError::NotLearner { id: 1 })
        );
        assert_eq!(
            m.apply(&ConfChange::Remove { id: 5 }),
            Err(ConfChangeError::UnknownMember { id: 5 })
        );
        assert_eq!(
            m.apply(&ConfChange::Promote { id: 5 }),
            Err(ConfChangeError::UnknownMember { id: 5 })
        );
        let added = m
            .apply(&ConfChange::AddLearner {
                id: 2,
                address: "a".into(),
            })
            .unwrap();
        assert_eq!(
            added.apply(&ConfChange::AddLearner {
                id: 3,
                address: "a".into()
            }),
            Err(ConfChangeError::AddressInUse {
                address: "a".into(),
                by: 2
            })
        );
        let promoted = added.apply(&ConfChange::Promote { id: 2 }).unwrap();
        assert!(promoted.is_voter(2) && !promoted.is_learner(2));
    }

    #[test]
    fn a_learner_is_a_member_that_cannot_be_added_twice() {
        let added = Membership::with_voters([1])
            .apply(&ConfChange::AddLearner {
                id: 2,
                address: "b".into(),
            })
            .unwrap();
        assert!(added.is_learner(2) && !added.is_voter(2));
        assert!(added.contains(2));
        assert_eq!(added.address(2), Some("b"));
        assert_eq!(added.members().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(
            added.apply(&ConfChange::AddLearner {
                id: 2,
                address: "c".into()
            }),
            Err(ConfChangeError::AlreadyMember { id: 2 })
        );
        assert_eq!(added.quorum(), 1, "a learner does not count for the quorum");
    }

    #[test]
    fn a_node_both_voter_and_learner_does_not_decode() {
        let mut both = Membership::with_voters([1, 2]);
        both.learners.insert(2, String::new());
        assert_eq!(Membership::decode(&both.encode()), None);
    }

    #[test]
    fn every_refusal_names_what_is_wrong() {
        let cases = [
            (ConfChangeError::NotLeader { hint: 3 }, "leader: 3"),
            (ConfChangeError::LeaderNotReady, "not committed an entry"),
            (
                ConfChangeError::ChangeInFlight { index: 42 },
                "log index 42",
            ),
            (ConfChangeError::TransferInProgress { to: 4 }, "node 4"),
            (
                ConfChangeError::AlreadyMember { id: 5 },
                "node 5 is already",
            ),
            (
                ConfChangeError::AddressInUse {
                    address: "h:1".into(),
                    by: 6,
                },
                "h:1 is already used by node 6",
            ),
            (
                ConfChangeError::UnknownMember { id: 7 },
                "node 7 is not a member",
            ),
            (
                ConfChangeError::NotLearner { id: 8 },
                "node 8 is not a learner",
            ),
            (ConfChangeError::NotVoter { id: 9 }, "node 9 is not a voter"),
            (
                ConfChangeError::LearnerBehind {
                    id: 10,
                    lag_entries: 11,
                },
                "learner 10 is 11 entries behind",
            ),
            (
                ConfChangeError::LastVoter { id: 12 },
                "node 12 is the last voter",
            ),
            (ConfChangeError::InvalidId, "id 0"),
        ];
        for (error, words) in cases {
            let text = error.to_string();
            assert!(text.contains(words), "{error:?} reads {text:?}");
        }
    }
}
