//! Abusive and fuzzed RESP input against a live node (the style of wire_abuse.rs and
//! wire_props.rs): a bulk length over the limit, a multibulk count in the millions,
//! binary garbage, an unterminated line, a slow client trickling a command, connections
//! past the cap, and random bytes (proptest). Each gets a Redis protocol error or a closed
//! connection — never a crash — and after each the node still serves a normal client.
//! One node with short `idle_timeout_ms` / `frame_timeout_ms`, so the server's own timeouts
//! close what the test leaves open.

mod process;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use process::Cluster;
use proptest::prelude::*;

const EXTRA: &str = r#""idle_timeout_ms":3000,"frame_timeout_ms":1500,"max_connections":16,"#;
/// How long the server may take to close what it must close, beyond its own timeout.
const CLOSE_SLACK: Duration = Duration::from_secs(10);

fn open(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to resp_port");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
}

/// Sends `bytes` and reads until the server closes (or `within` passes): what it answered.
fn answer_then_close(port: u16, bytes: &[u8], within: Duration) -> (String, bool) {
    let (got, closed) = raw_answer(port, bytes, within);
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

/// [`answer_then_close`], with the answer's bytes as they came.
fn raw_answer(port: u16, bytes: &[u8], within: Duration) -> (Vec<u8>, bool) {
    let mut stream = open(port);
    // The server may close before taking everything: a write error is part of the test.
    let _ = stream.write_all(bytes);
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        stream
            .set_read_timeout(Some(
                within
                    .saturating_sub(start.elapsed())
                    .max(Duration::from_millis(1)),
            ))
            .unwrap();
        match stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
        if start.elapsed() >= within {
            break false;
        }
    };
    (got, closed)
}

/// A normal client still gets served: SET then GET through the redis crate.
fn still_serves(port: u16, tag: &str) {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
    let mut con = client
        .get_connection_with_timeout(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("after {tag}: cannot connect: {e}"));
    con.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _: () = redis::cmd("SET")
        .arg("alive")
        .arg(tag)
        .query(&mut con)
        .unwrap();
    let value: String = redis::cmd("GET").arg("alive").query(&mut con).unwrap();
    assert_eq!(value, tag);
}

fn start() -> (Cluster, u16) {
    let mut cluster = Cluster::start("resp-abuse", 1, EXTRA);
    cluster.wait_leader(Duration::from_secs(10));
    let port = cluster.resp_ports[0];
    still_serves(port, "start");
    (cluster, port)
}

#[test]
fn oversized_malformed_and_slow_requests_get_errors_or_closes_and_the_node_serves_on() {
    let (mut cluster, port) = start();
    let quick = Duration::from_secs(10);
    let cases: &[(&str, &[u8], &str)] = &[
        (
            "a multibulk count in the millions",
            b"*50000000\r\n",
            "-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            "a bulk length over the limit",
            b"*2\r\n$3\r\nSET\r\n$999999999\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            "a negative bulk length",
            b"*1\r\n$-5\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            "not a bulk string inside a multibulk",
            b"*1\r\n:12\r\n",
            "-ERR Protocol error: expected '$', got ':'\r\n",
        ),
        (
            "binary garbage after a good command",
            b"PING\r\n*\x01\xff\xfe\r\n",
            "+PONG\r\n-ERR Protocol error: invalid multibulk length\r\n",
        ),
    ];
    for (what, bytes, want) in cases {
        let (got, closed) = answer_then_close(port, bytes, quick);
        assert_eq!(got, *want, "{what}");
        assert!(
            closed,
            "{what}: the connection stays open after a protocol error"
        );
        still_serves(port, what);
    }
    // An unterminated line longer than the inline limit (64 KiB).
    let (got, closed) = answer_then_close(port, &vec![b'a'; 200 * 1024], quick);
    assert_eq!(got, "-ERR Protocol error: too big inline request\r\n");
    assert!(closed);
    still_serves(port, "unterminated line");
    // Garbage that parses as inline commands: each is an unknown command, and the
    // connection stays usable.
    let (got, _) = answer_then_close(port, b"\x00\x01garbage \xff\r\nPING\r\nQUIT\r\n", quick);
    assert!(got.starts_with("-ERR unknown command '"), "{got}");
    assert!(got.ends_with("+PONG\r\n+OK\r\n"), "{got}");

    // A slow client: half a command, then silence; closed by frame_timeout_ms, while
    // another client is served meanwhile.
    let mut slow = open(port);
    slow.write_all(b"*2\r\n$3\r\nGET\r\n$5\r\nab").unwrap();
    still_serves(port, "during a slow client");
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let read = slow.read(&mut buf);
    assert!(
        matches!(read, Ok(0))
            || matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the slow client was answered {read:?}"
    );
    assert!(start.elapsed() < Duration::from_millis(1500) + CLOSE_SLACK);

    // A declared million-argument command, never sent: bounded by the same timeout.
    let (got, closed) = answer_then_close(
        port,
        b"*1000000\r\n$1\r\na\r\n",
        Duration::from_millis(1500) + CLOSE_SLACK,
    );
    assert_eq!(got, "");
    assert!(closed, "a command that never completes is not closed");

    // Past the connection cap (max_connections 16): Redis's error, then the close.
    let held: Vec<TcpStream> = (0..16).map(|_| open(port)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let (got, closed) = answer_then_close(port, b"PING\r\n", quick);
    assert_eq!(got, "-ERR max number of clients reached\r\n");
    assert!(closed);
    drop(held);
    // The held connections are closed by their owner; their threads end.
    let deadline = Instant::now() + CLOSE_SLACK;
    loop {
        let (got, _) = answer_then_close(port, b"PING\r\nQUIT\r\n", quick);
        if got == "+PONG\r\n+OK\r\n" {
            break;
        }
        assert!(Instant::now() < deadline, "the cap never freed up: {got}");
        std::thread::sleep(Duration::from_millis(100));
    }
    still_serves(port, "the end");
    cluster.assert_alive();
}

/// The end of the RESP reply starting at `pos`, or `None` when `bytes` holds no whole,
/// well-formed reply there.
fn reply_end(bytes: &[u8], pos: usize) -> Option<usize> {
    let line_end = pos + bytes.get(pos..)?.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&bytes[pos + 1..line_end]).ok()?;
    let after = line_end + 2;
    match *bytes.get(pos)? {
        b'+' | b'-' => Some(after),
        b':' => line.parse::<i64>().ok().map(|_| after),
        b'$' => match line.parse::<i64>().ok()? {
            -1 => Some(after),
            n if n >= 0 => {
                let end = after + n as usize;
                (bytes.get(end..end + 2)? == b"\r\n").then_some(end + 2)
            }
            _ => None,
        },
        b'*' => {
            let mut at = after;
            for _ in 0..line.parse::<usize>().ok()? {
                at = reply_end(bytes, at)?;
            }
            Some(at)
        }
        _ => None,
    }
}

/// Random bytes after a randomly mutated valid pipeline: whatever the node answers is a
/// sequence of whole RESP replies, and a normal client is served afterwards.
#[test]
fn random_input_gets_whole_replies_and_never_breaks_the_node() {
    use proptest::test_runner::{Config, TestRunner};
    let (mut cluster, port) = start();
    let mut runner = TestRunner::new(Config {
        cases: 32,
        ..Config::default()
    });
    let inputs = (
        proptest::collection::vec(any::<u8>(), 0..600),
        proptest::collection::vec((0usize..64, any::<u8>()), 0..6),
    );
    runner
        .run(&inputs, |(noise, flips)| {
            let mut pipeline =
                b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nvv\r\n*2\r\n$4\r\nECHO\r\n$3\r\nabc\r\n"
                    .to_vec();
            for (at, byte) in flips {
                let at = at % pipeline.len();
                pipeline[at] = byte;
            }
            pipeline.extend_from_slice(&noise);
            pipeline.extend_from_slice(b"\r\nQUIT\r\n");
            let (bytes, _) = raw_answer(port, &pipeline, Duration::from_secs(3));
            let got = String::from_utf8_lossy(&bytes);
            let bytes = &bytes[..];
            let mut at = 0;
            while at < bytes.len() {
                match reply_end(bytes, at) {
                    Some(end) => at = end,
                    None => prop_assert!(false, "not whole RESP replies: {got:?}"),
                }
            }
            still_serves(port, "random input");
            Ok(())
        })
        .unwrap();
    cluster.assert_alive();
}

/// A client that pipelines reads of a large value and never reads the replies: the server
/// stops reading its commands once its unsent replies pile up, serves every other client
/// meanwhile, and closes it after `idle_timeout_ms` (3 s here) without progress — it does
/// not buffer the replies of everything the client sent (400 MB here).
#[test]
fn a_client_that_never_reads_its_replies_is_closed_and_costs_no_one_else() {
    let (mut cluster, port) = start();
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
    let mut con = client
        .get_connection_with_timeout(Duration::from_secs(10))
        .unwrap();
    let big = vec![b'x'; 200 * 1024];
    let _: () = redis::cmd("SET")
        .arg("big")
        .arg(&big)
        .query(&mut con)
        .unwrap();
    drop(con);

    let gets = 2000;
    let mut deaf = open(port);
    deaf.set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // 2000 small commands: all of them fit in the socket buffers, whatever the server does.
    deaf.write_all(&b"GET big\r\n".repeat(gets)).unwrap();
    let sent = Instant::now();
    // Served meanwhile, before and after the server gave up on the deaf client.
    still_serves(port, "while a client does not read");
    std::thread::sleep(Duration::from_millis(4000).saturating_sub(sent.elapsed()));
    still_serves(port, "after the deaf client's timeout");
    // Now read what the server had sent before it gave up: far from every reply, and then
    // the close.
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + CLOSE_SLACK;
    let closed = loop {
        match deaf.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(e) => panic!("the deaf client was neither answered nor closed: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "the deaf client is still being served after {got} bytes"
        );
    };
    assert!(closed);
    let all = gets * (big.len() + 16);
    assert!(
        got < all / 10,
        "the server sent {got} of {all} bytes to a client that read nothing for 4 s"
    );
    still_serves(port, "the end");
    cluster.assert_alive();
}
