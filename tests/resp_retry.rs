//! A Redis write retried inside the cluster is applied once (issue 15): a RESP connection
//! holds one client session, and when the first attempt of a write is answered with an
//! error it retries (TIMEOUT, NOT_LEADER after a leader change) although that attempt in
//! fact commits, the retry must carry the same sequence number, so that the session table
//! answers it as a duplicate instead of applying it again.
//!
//! The scenario is forced on an in-process cluster through its link filter: the followers'
//! messages to the leader are dropped (one way only), so the leader's entry of the APPEND
//! reaches both followers but no acknowledgement comes back. The leader cannot commit; it
//! answers TIMEOUT, then steps down (check-quorum) and fails the waiting write NOT_LEADER.
//! The connection retries; a follower is elected, and it commits the first attempt's entry
//! (it is on a majority). The APPEND must be in the final value exactly once, and its
//! reply must be the value's length after one append.
//!
//! Tested both ways a RESP write reaches the leader: sent in-process by a connection on
//! the leader (its retry runs through `Clerk::exec_after`), and forwarded over RPC by a
//! connection on a follower (retried inside `Clerk::exec`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::TestCluster;
use kvstore_raft::raft::{NodeId, Role};

/// Election timeouts long enough that the leader's entry reaches the followers before
/// check-quorum deposes it (at least `election_timeout_min_ms` after the cut), short enough
/// that the connection's retries (10 s) outlast the step-down and the next election.
const TIMINGS: &str =
    r#""election_timeout_min_ms":600,"election_timeout_max_ms":1200,"request_timeout_ms":500"#;
/// Scenarios tried before the test gives up on setting one up (a machine too slow to get
/// an entry to a follower within `election_timeout_min_ms`).
const SETUPS: usize = 4;
const WAIT: Duration = Duration::from_secs(20);

/// A blocking RESP2 client on one connection: commands out, replies as their raw text.
struct RawResp {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl RawResp {
    fn connect(addr: SocketAddr) -> RawResp {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        RawResp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    fn send(&mut self, args: &[&str]) {
        let mut frame = format!("*{}\r\n", args.len());
        for arg in args {
            frame.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        self.writer.write_all(frame.as_bytes()).expect("send");
    }

    /// The next reply: a line (`:2`, `+OK`, `-ERR ...`), or a bulk string's content.
    fn reply(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("a reply line");
        let line = line.trim_end().to_string();
        match line.strip_prefix('$').map(str::parse::<i64>) {
            Some(Ok(len)) if len >= 0 => {
                let mut bulk = vec![0u8; len as usize + 2];
                self.reader.read_exact(&mut bulk).expect("a bulk string");
                bulk.truncate(len as usize);
                String::from_utf8(bulk).expect("UTF-8")
            }
            _ => line,
        }
    }

    fn call(&mut self, args: &[&str]) -> String {
        self.send(args);
        self.reply()
    }
}

/// Waits (bounded) for `what` to hold of the cluster; `None` after `timeout`.
fn wait_for<T>(timeout: Duration, mut what: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(found) = what() {
            return Some(found);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// One scenario on key `key` through a RESP connection on the leader (`on_leader`) or on a
/// follower. `Err` when the scenario could not be set up (the entry did not reach a
/// follower while the leader still led its term); panics when the write was not applied
/// exactly once.
fn retried_append(cluster: &TestCluster, on_leader: bool, key: &str) -> Result<(), String> {
    let leader = cluster.wait_leader(WAIT);
    let followers: Vec<NodeId> = (1..=3).filter(|&id| id != leader).collect();
    let node = if on_leader { leader } else { followers[0] };
    let resp = cluster.resp_server(node);
    let mut con = RawResp::connect(resp.local_addr());
    // Opens the connection's session (and routes its clerk to the leader).
    assert_eq!(con.call(&["APPEND", key, "x"]), ":1", "the first APPEND");
    let status = cluster.status(leader).expect("the leader runs");
    if status.role != Role::Leader {
        return Err(format!("node {leader} lost its leadership before the cut"));
    }
    let term = status.term;
    cluster.wait_applied(status.commit, WAIT);
    let before = cluster.status(leader).expect("runs").last_index;

    for &follower in &followers {
        cluster.cut_one_way(follower, leader);
    }
    con.send(&["APPEND", key, "y"]);
    // The entry of the first attempt reaches a follower in the leader's term: with the
    // leader's own copy it is on a majority, so whichever node leads next commits it.
    let reached = wait_for(WAIT, || {
        followers.iter().find_map(|&id| {
            let s = cluster.status(id)?;
            (s.last_index > before).then_some((id, s.term))
        })
    });
    let setup = match reached {
        Some((_, t)) if t == term => Ok(()),
        Some((id, t)) => Err(format!(
            "node {id} had a new entry only in term {t}, after node {leader}'s term {term}"
        )),
        None => Err("the APPEND reached no follower".to_string()),
    };
    // The leader cannot commit while no acknowledgement comes back: the first attempt is
    // answered TIMEOUT, and at the latest NOT_LEADER when check-quorum deposes the leader.
    let deposed = wait_for(WAIT, || {
        let s = cluster.status(leader)?;
        (s.role != Role::Leader || s.term != term).then_some(s)
    })
    .unwrap_or_else(|| panic!("node {leader} still leads term {term} with no acknowledgements"));
    assert!(
        deposed.commit <= before,
        "node {leader} committed index {} itself while cut off: the first attempt was not \
         left unanswered",
        deposed.commit
    );
    cluster.heal();
    let reply = con.reply();
    let value = con.call(&["GET", key]);
    drop(con);
    drop(resp);
    let via = if on_leader {
        "sent in-process on the leader"
    } else {
        "forwarded from a follower"
    };
    match setup {
        Ok(()) => {
            let applied = value.matches('y').count();
            assert_eq!(
                (value.as_str(), reply.as_str()),
                ("xy", ":2"),
                "an APPEND {via}, whose first attempt committed but was answered with an error, \
                 was applied {applied} times (GET {key} = {value:?}, APPEND answered {reply:?}): \
                 the connection retried it under a new sequence number"
            );
            Ok(())
        }
        Err(why) => Err(why),
    }
}

fn retried_append_is_applied_once(on_leader: bool) {
    let cluster = TestCluster::start(3, TIMINGS);
    let mut failures = Vec::new();
    for n in 0..SETUPS {
        match retried_append(&cluster, on_leader, &format!("k{n}")) {
            Ok(()) => return,
            Err(why) => {
                eprintln!("scenario {n} not set up, trying again: {why}");
                failures.push(why);
            }
        }
    }
    panic!("the scenario could not be set up in {SETUPS} tries: {failures:?}");
}

#[test]
fn resp_write_retried_on_the_leader_after_a_lost_commit_is_applied_once() {
    retried_append_is_applied_once(true);
}

#[test]
fn resp_write_forwarded_from_a_follower_and_retried_is_applied_once() {
    retried_append_is_applied_once(false);
}
