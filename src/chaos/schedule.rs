//! The fault schedule: a list of fault episodes (start, duration, fault)
//! drawn from a seeded SplitMix64, so the same seed, cluster size, duration
//! and fault kinds give the same schedule. Episodes never overlap and each
//! one leaves a majority of the nodes healthy and connected, so the cluster
//! can keep making progress; a target may be "the leader", which the runner
//! resolves when the episode starts (falling back to a node drawn here).

use std::fmt;
use std::str::FromStr;

use crate::raft::SplitMix64;

/// The kinds of fault the runner knows, as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// kill -9 a node, restart it on the same data directory at the end.
    Kill,
    /// SIGSTOP the leader for longer than an election timeout, then SIGCONT
    /// (sometimes while it is still cut off: the stale-leader case).
    Pause,
    /// Cut every link of one node.
    Isolate,
    /// A minority of the nodes cut off from the majority.
    Split,
    /// Two sides that cannot talk, and one node that talks to both.
    Bridge,
    /// One node's messages out (or in) lost; the other way works.
    OneWay,
    /// Every link delays its frames.
    Delay,
    /// Every link drops a share of its frames.
    Drop,
    /// One node's fsyncs wait (needs kvserver's `--fault-file`).
    DiskStall,
    /// A node (sometimes the leader) is removed from the membership, killed
    /// and its data directory wiped; at the end it comes back under a new
    /// id with `--join` and is added as a new member (learner, then voter).
    Membership,
}

impl FaultKind {
    pub const ALL: [FaultKind; 10] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::Isolate,
        FaultKind::Split,
        FaultKind::Bridge,
        FaultKind::OneWay,
        FaultKind::Delay,
        FaultKind::Drop,
        FaultKind::DiskStall,
        FaultKind::Membership,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Isolate => "isolate",
            FaultKind::Split => "split",
            FaultKind::Bridge => "bridge",
            FaultKind::OneWay => "oneway",
            FaultKind::Delay => "delay",
            FaultKind::Drop => "drop",
            FaultKind::DiskStall => "stall",
            FaultKind::Membership => "membership",
        }
    }

    /// Parses `kill,pause,...` or `all`; one line naming the bad word.
    pub fn parse_list(text: &str) -> Result<Vec<FaultKind>, String> {
        if text.trim() == "all" {
            return Ok(FaultKind::ALL.to_vec());
        }
        let mut kinds = Vec::new();
        for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let kind = word.parse()?;
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        if kinds.is_empty() {
            return Err(format!("--faults {text:?} names no fault"));
        }
        Ok(kinds)
    }
}

impl FromStr for FaultKind {
    type Err = String;

    fn from_str(word: &str) -> Result<FaultKind, String> {
        FaultKind::ALL
            .into_iter()
            .find(|kind| kind.name() == word)
            .ok_or_else(|| {
                let names: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
                format!(
                    "unknown fault {word:?} (known: {}, or all)",
                    names.join(",")
                )
            })
    }
}

/// A node a fault aims at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The leader when the episode starts; `fallback` when there is none.
    Leader {
        fallback: u64,
    },
    Node(u64),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Leader { .. } => f.write_str("the leader"),
            Target::Node(id) => write!(f, "node {id}"),
        }
    }
}

/// One fault, with every choice made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    Kill {
        target: Target,
    },
    /// `cut_off`: the node is also cut from its peers, and stays cut off
    /// for a moment after SIGCONT, so that it wakes up still believing it
    /// leads while a new leader has taken over (a long GC pause followed by
    /// a slow network): the case a leader lease must survive.
    Pause {
        target: Target,
        cut_off: bool,
    },
    Isolate {
        target: Target,
    },
    Split {
        minority: Vec<u64>,
        majority: Vec<u64>,
    },
    Bridge {
        left: Vec<u64>,
        bridge: u64,
        right: Vec<u64>,
    },
    /// `outgoing`: the target's messages to the others are lost; otherwise
    /// the others' messages to it.
    OneWay {
        target: Target,
        outgoing: bool,
    },
    Delay {
        delay_ms: u64,
    },
    Drop {
        percent: u32,
    },
    DiskStall {
        target: Target,
    },
    Membership {
        target: Target,
    },
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Kill { target } => write!(f, "kill -9 {target}, then restart it"),
            Fault::Pause {
                target,
                cut_off: false,
            } => write!(f, "SIGSTOP {target}, then SIGCONT"),
            Fault::Pause {
                target,
                cut_off: true,
            } => write!(
                f,
                "SIGSTOP {target} and cut it off; SIGCONT while still cut off"
            ),
            Fault::Isolate { target } => write!(f, "isolate {target}"),
            Fault::Split { minority, majority } => {
                write!(f, "split {minority:?} | {majority:?}")
            }
            Fault::Bridge {
                left,
                bridge,
                right,
            } => write!(f, "bridge {left:?} <- {bridge} -> {right:?}"),
            Fault::OneWay { target, outgoing } => {
                if *outgoing {
                    write!(f, "one-way loss: messages from {target} lost")
                } else {
                    write!(f, "one-way loss: messages to {target} lost")
                }
            }
            Fault::Delay { delay_ms } => write!(f, "delay every link by {delay_ms} ms"),
            Fault::Drop { percent } => write!(f, "drop {percent}% of frames on every link"),
            Fault::DiskStall { target } => write!(f, "stall the fsyncs of {target}"),
            Fault::Membership { target } => write!(
                f,
                "remove {target}, wipe its disk, add it back under a new id"
            ),
        }
    }
}

/// A fault and when it holds: from `start_ms` (since the clients started)
/// for `duration_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Episode {
    pub start_ms: u64,
    pub duration_ms: u64,
    pub fault: Fault,
}

impl Episode {
    pub fn end_ms(&self) -> u64 {
        self.start_ms + self.duration_ms
    }
}

/// The timing of a schedule, in milliseconds.
#[derive(Clone, Debug)]
pub struct ScheduleTiming {
    /// The run's length; every episode ends by then.
    pub duration_ms: u64,
    /// Quiet time at the start, so the clients get going first.
    pub warmup_ms: u64,
    /// A pause lasts at least this long: longer than an election timeout.
    pub min_pause_ms: u64,
}

/// How long episodes and the gaps between them last.
const EPISODE_MS: (u64, u64) = (1_000, 4_000);
const GAP_MS: (u64, u64) = (300, 1_500);
const DELAY_MS: (u64, u64) = (5, 120);
const DROP_PERCENT: (u64, u64) = (5, 35);

/// Draws the episodes for `nodes` nodes (ids 1..=nodes) from `seed`.
/// Requires `nodes >= 1` and at least one kind.
pub fn generate(
    seed: u64,
    nodes: u64,
    kinds: &[FaultKind],
    timing: &ScheduleTiming,
) -> Vec<Episode> {
    assert!(
        nodes >= 1 && !kinds.is_empty(),
        "a schedule needs nodes and kinds"
    );
    let mut rng = SplitMix64::new(seed);
    let mut episodes = Vec::new();
    let mut now_ms = timing.warmup_ms;
    // Kinds that need more nodes than the cluster has are skipped.
    let usable: Vec<FaultKind> = kinds
        .iter()
        .copied()
        .filter(|kind| nodes >= min_nodes(*kind))
        .collect();
    if usable.is_empty() {
        return episodes;
    }
    loop {
        let kind = usable[rng.range(0, usable.len() as u64) as usize];
        let mut duration_ms = rng.range(EPISODE_MS.0, EPISODE_MS.1);
        if kind == FaultKind::Pause {
            duration_ms = duration_ms.max(timing.min_pause_ms);
        }
        let fault = draw_fault(&mut rng, kind, nodes);
        if now_ms + duration_ms > timing.duration_ms {
            // The last episode is cut to end with the run, so that the
            // final heal ends a fault and the recovery measured after it
            // means something; unless too little time is left.
            let left_ms = timing.duration_ms.saturating_sub(now_ms);
            let shortest_ms = match kind {
                FaultKind::Pause => timing.min_pause_ms,
                _ => EPISODE_MS.0,
            };
            if left_ms >= shortest_ms {
                episodes.push(Episode {
                    start_ms: now_ms,
                    duration_ms: left_ms,
                    fault,
                });
            }
            return episodes;
        }
        episodes.push(Episode {
            start_ms: now_ms,
            duration_ms,
            fault,
        });
        now_ms += duration_ms + rng.range(GAP_MS.0, GAP_MS.1);
    }
}

/// The fewest nodes a kind needs to leave a connected majority.
fn min_nodes(kind: FaultKind) -> u64 {
    match kind {
        FaultKind::Delay | FaultKind::Drop => 1,
        _ => 3,
    }
}

fn draw_fault(rng: &mut SplitMix64, kind: FaultKind, nodes: u64) -> Fault {
    match kind {
        FaultKind::Kill => Fault::Kill {
            target: draw_target(rng, nodes, 1, 2),
        },
        FaultKind::Pause => Fault::Pause {
            target: draw_target(rng, nodes, 1, 1),
            cut_off: rng.chance(1, 2),
        },
        FaultKind::Isolate => Fault::Isolate {
            target: draw_target(rng, nodes, 1, 2),
        },
        FaultKind::OneWay => Fault::OneWay {
            target: draw_target(rng, nodes, 1, 2),
            outgoing: rng.chance(1, 2),
        },
        FaultKind::DiskStall => Fault::DiskStall {
            target: draw_target(rng, nodes, 1, 2),
        },
        FaultKind::Membership => Fault::Membership {
            target: draw_target(rng, nodes, 1, 3),
        },
        FaultKind::Split => {
            let order = shuffled(rng, nodes);
            let minority_size = rng.range(1, (nodes - 1) / 2 + 1) as usize;
            let (minority, majority) = order.split_at(minority_size);
            Fault::Split {
                minority: sorted(minority),
                majority: sorted(majority),
            }
        }
        FaultKind::Bridge => {
            // The bridge and the left side are a majority: it can elect a
            // leader that the right side also hears through the bridge.
            let order = shuffled(rng, nodes);
            let left_size = ((nodes - 1) / 2) as usize;
            Fault::Bridge {
                bridge: order[0],
                left: sorted(&order[1..=left_size]),
                right: sorted(&order[left_size + 1..]),
            }
        }
        FaultKind::Delay => Fault::Delay {
            delay_ms: rng.range(DELAY_MS.0, DELAY_MS.1),
        },
        FaultKind::Drop => Fault::Drop {
            percent: rng.range(DROP_PERCENT.0, DROP_PERCENT.1) as u32,
        },
    }
}

/// The leader with probability `numerator / denominator`, else a node.
fn draw_target(rng: &mut SplitMix64, nodes: u64, numerator: u64, denominator: u64) -> Target {
    let node = rng.range(1, nodes + 1);
    if rng.chance(numerator, denominator) {
        Target::Leader { fallback: node }
    } else {
        Target::Node(node)
    }
}

/// The ids 1..=nodes in a random order (Fisher-Yates).
fn shuffled(rng: &mut SplitMix64, nodes: u64) -> Vec<u64> {
    let mut ids: Vec<u64> = (1..=nodes).collect();
    for i in (1..ids.len()).rev() {
        let j = rng.range(0, i as u64 + 1) as usize;
        ids.swap(i, j);
    }
    ids
}

fn sorted(ids: &[u64]) -> Vec<u64> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(duration_ms: u64) -> ScheduleTiming {
        ScheduleTiming {
            duration_ms,
            warmup_ms: 1_000,
            min_pause_ms: 1_500,
        }
    }

    #[test]
    fn same_seed_same_schedule_and_other_seeds_differ() {
        let kinds = FaultKind::ALL;
        let a = generate(42, 5, &kinds, &timing(60_000));
        let b = generate(42, 5, &kinds, &timing(60_000));
        assert_eq!(a, b);
        assert!(a.len() >= 8, "a minute holds many episodes: {}", a.len());
        let c = generate(43, 5, &kinds, &timing(60_000));
        assert_ne!(a, c);
    }

    #[test]
    fn episodes_do_not_overlap_and_end_in_time() {
        for seed in 0..50 {
            let episodes = generate(seed, 5, &FaultKind::ALL, &timing(30_000));
            for pair in episodes.windows(2) {
                assert!(pair[0].end_ms() < pair[1].start_ms, "{pair:?}");
            }
            assert!(!episodes.is_empty());
            for episode in &episodes {
                assert!(episode.start_ms >= 1_000 && episode.end_ms() <= 30_000);
                if let Fault::Pause { .. } = episode.fault {
                    assert!(episode.duration_ms >= 1_500);
                }
            }
        }
    }

    #[test]
    fn every_episode_leaves_a_majority() {
        for seed in 0..200 {
            for nodes in [3, 5, 7] {
                for episode in generate(seed, nodes, &FaultKind::ALL, &timing(20_000)) {
                    let majority = nodes / 2 + 1;
                    match episode.fault {
                        Fault::Split {
                            minority,
                            majority: rest,
                        } => {
                            assert!(rest.len() as u64 >= majority);
                            assert_eq!(minority.len() + rest.len(), nodes as usize);
                        }
                        Fault::Bridge { left, right, .. } => {
                            assert!(left.len() as u64 + 1 >= majority);
                            assert_eq!(left.len() + right.len() + 1, nodes as usize);
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    #[test]
    fn fault_lists_parse_and_bad_names_are_refused() {
        assert_eq!(
            FaultKind::parse_list("kill, pause,kill").unwrap(),
            vec![FaultKind::Kill, FaultKind::Pause]
        );
        assert_eq!(FaultKind::parse_list("all").unwrap().len(), 10);
        let error = FaultKind::parse_list("kill,flood").unwrap_err();
        assert!(error.contains("\"flood\""), "{error}");
        assert!(FaultKind::parse_list(",").is_err());
    }
}
