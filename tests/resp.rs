//! The Redis protocol against a 3-node cluster of real `kvserver` processes, through the
//! `redis` crate (a client library no one here wrote): every command with its reply type
//! and error text, pipelining, connecting to a follower, MSET atomicity, INCR from many
//! threads, and — under kill -9 and SIGSTOP of the leader — concurrent clients whose
//! GET/SET/APPEND history must be linearizable with every acknowledged APPEND present
//! exactly once (the project's checker).

mod process;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use kvstore_raft::check::{KvInput, KvOutput, Operation};
use process::{element, Cluster, Recorded};
use redis::Value;

const FIRST_LEADER: Duration = Duration::from_secs(10);

fn connect(cluster: &Cluster, id: u64) -> redis::Connection {
    let port = cluster.resp_ports[(id - 1) as usize];
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).expect("a client");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.get_connection_with_timeout(Duration::from_secs(5)) {
            Ok(con) => {
                con.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                return con;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("connecting to node {id}: {e}");
                sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("cannot connect to node {id}'s resp_port {port}: {e}"),
        }
    }
}

/// Runs one command; an error reply as its whole line ("ERR ...").
fn q(con: &mut redis::Connection, args: &[&str]) -> Result<Value, String> {
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query::<Value>(con).map_err(|e| {
        format!(
            "{} {}",
            e.code().unwrap_or("?"),
            e.detail().unwrap_or_default()
        )
    })
}

fn ok(con: &mut redis::Connection, args: &[&str]) -> Value {
    q(con, args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn bulk(s: &str) -> Value {
    Value::BulkString(s.as_bytes().to_vec())
}

fn status(s: &str) -> Value {
    Value::SimpleString(s.to_string())
}

/// The id of a node that is not the leader.
fn follower_of(cluster: &mut Cluster) -> (u64, u64) {
    let (leader, _) = cluster.wait_leader(FIRST_LEADER);
    let follower = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
    (leader, follower)
}

#[test]
fn every_command_answers_as_redis_does_on_a_follower_and_the_leader() {
    let mut cluster = Cluster::start("resp-commands", 3, "");
    let (leader, follower) = follower_of(&mut cluster);
    let mut f = connect(&cluster, follower);
    let mut l = connect(&cluster, leader);

    assert_eq!(ok(&mut f, &["PING"]), status("PONG"));
    assert_eq!(ok(&mut f, &["PING", "hi"]), bulk("hi"));
    assert_eq!(ok(&mut f, &["ECHO", "x y"]), bulk("x y"));
    // Writes on a follower, reads on the leader and back.
    assert_eq!(ok(&mut f, &["SET", "k", "v"]), Value::Okay);
    assert_eq!(ok(&mut l, &["GET", "k"]), bulk("v"));
    assert_eq!(ok(&mut f, &["GET", "missing"]), Value::Nil);
    assert_eq!(ok(&mut f, &["SET", "k", "w", "NX"]), Value::Nil);
    assert_eq!(ok(&mut f, &["SET", "k2", "w", "XX"]), Value::Nil);
    assert_eq!(ok(&mut f, &["SET", "k", "w", "XX", "GET"]), bulk("v"));
    assert_eq!(ok(&mut f, &["SET", "k2", "a", "GET"]), Value::Nil);
    assert_eq!(
        q(&mut f, &["SET", "k", "v", "EX", "10"]),
        Err("ERR expiry (EX, PX, EXAT, PXAT, KEEPTTL) is not supported: keys of kvstore-raft do not expire".into())
    );
    assert_eq!(
        q(&mut f, &["SET", "k", "v", "NX", "XX"]),
        Err("ERR syntax error".into())
    );
    assert_eq!(ok(&mut f, &["SETNX", "k", "z"]), Value::Int(0));
    assert_eq!(ok(&mut f, &["SETNX", "fresh", "z"]), Value::Int(1));
    assert_eq!(ok(&mut f, &["GETSET", "fresh", "y"]), bulk("z"));
    assert_eq!(ok(&mut f, &["GETDEL", "fresh"]), bulk("y"));
    assert_eq!(ok(&mut f, &["GETDEL", "fresh"]), Value::Nil);
    assert_eq!(ok(&mut f, &["APPEND", "s", "ab"]), Value::Int(2));
    assert_eq!(ok(&mut l, &["APPEND", "s", "cde"]), Value::Int(5));
    assert_eq!(ok(&mut f, &["STRLEN", "s"]), Value::Int(5));
    assert_eq!(ok(&mut f, &["STRLEN", "nope"]), Value::Int(0));
    assert_eq!(ok(&mut f, &["EXISTS", "s", "s", "nope"]), Value::Int(2));
    assert_eq!(ok(&mut f, &["TYPE", "s"]), status("string"));
    assert_eq!(ok(&mut f, &["TYPE", "nope"]), status("none"));
    assert_eq!(ok(&mut f, &["INCR", "n"]), Value::Int(1));
    assert_eq!(ok(&mut f, &["INCRBY", "n", "41"]), Value::Int(42));
    assert_eq!(ok(&mut f, &["DECR", "n"]), Value::Int(41));
    assert_eq!(ok(&mut f, &["DECRBY", "n", "50"]), Value::Int(-9));
    let not_integer = Err("ERR value is not an integer or out of range".to_string());
    assert_eq!(q(&mut f, &["INCR", "s"]), not_integer);
    assert_eq!(q(&mut f, &["INCRBY", "n", "x"]), not_integer);
    ok(&mut f, &["SET", "big", &i64::MAX.to_string()]);
    assert_eq!(
        q(&mut f, &["INCR", "big"]),
        Err("ERR increment or decrement would overflow".into())
    );
    assert_eq!(ok(&mut f, &["GET", "big"]), bulk(&i64::MAX.to_string()));
    assert_eq!(ok(&mut f, &["MSET", "a", "1", "b", "2"]), Value::Okay);
    assert_eq!(
        ok(&mut l, &["MGET", "a", "nope", "b"]),
        Value::Array(vec![bulk("1"), Value::Nil, bulk("2")])
    );
    assert_eq!(ok(&mut f, &["MSETNX", "c", "3", "a", "9"]), Value::Int(0));
    assert_eq!(
        ok(&mut f, &["EXISTS", "c"]),
        Value::Int(0),
        "MSETNX is all or nothing"
    );
    assert_eq!(ok(&mut f, &["MSETNX", "c", "3", "d", "4"]), Value::Int(1));
    assert_eq!(
        q(&mut f, &["MSET", "a", "1", "b"]),
        Err("ERR wrong number of arguments for 'mset' command".into())
    );
    assert_eq!(ok(&mut f, &["DEL", "c", "d", "nope", "c"]), Value::Int(2));
    assert_eq!(
        q(&mut f, &["GET"]),
        Err("ERR wrong number of arguments for 'get' command".into())
    );

    // The keyspace: k k2 s n big a b = 7 keys.
    assert_eq!(ok(&mut f, &["DBSIZE"]), Value::Int(7));
    let mut keys: Vec<Vec<u8>> = redis::from_redis_value(&ok(&mut f, &["KEYS", "*"])).unwrap();
    keys.sort();
    assert_eq!(keys, [&b"a"[..], b"b", b"big", b"k", b"k2", b"n", b"s"]);
    let matched: Vec<String> = redis::from_redis_value(&ok(&mut f, &["KEYS", "k*"])).unwrap();
    assert_eq!(matched, ["k", "k2"]);
    // SCAN walks the ordered keyspace in steps of COUNT; the cursor ends at 0.
    let mut seen = Vec::new();
    let mut cursor = "0".to_string();
    let mut calls = 0;
    loop {
        let reply = ok(&mut f, &["SCAN", &cursor, "COUNT", "3"]);
        let (next, batch): (String, Vec<String>) = redis::from_redis_value(&reply).unwrap();
        assert!(batch.len() <= 3);
        seen.extend(batch);
        calls += 1;
        cursor = next;
        if cursor == "0" {
            break;
        }
        assert!(calls < 10, "SCAN never ended");
    }
    assert_eq!(seen, ["a", "b", "big", "k", "k2", "n", "s"]);
    let reply = ok(&mut f, &["SCAN", "0", "MATCH", "b*", "COUNT", "100"]);
    let (next, batch): (String, Vec<String>) = redis::from_redis_value(&reply).unwrap();
    assert_eq!(
        (next.as_str(), batch),
        ("0", vec!["b".to_string(), "big".to_string()])
    );
    // The redis crate's own SCAN iterator.
    let all: Vec<String> = redis::Commands::scan_match(&mut l, "k*").unwrap().collect();
    assert_eq!(all, ["k", "k2"]);
    assert_eq!(
        q(&mut f, &["SCAN", "777"]).unwrap_err(),
        "ERR invalid cursor (SCAN cursors belong to the connection that got them)"
    );

    // Connection commands.
    assert_eq!(ok(&mut f, &["SELECT", "0"]), Value::Okay);
    assert_eq!(
        q(&mut f, &["SELECT", "1"]),
        Err("ERR DB index is out of range".into())
    );
    assert_eq!(ok(&mut f, &["CLIENT", "SETNAME", "tester"]), Value::Okay);
    assert_eq!(ok(&mut f, &["CLIENT", "GETNAME"]), bulk("tester"));
    assert!(matches!(ok(&mut f, &["CLIENT", "ID"]), Value::Int(id) if id > 0));
    let info: String = redis::from_redis_value(&ok(&mut f, &["CLIENT", "INFO"])).unwrap();
    assert!(info.contains("name=tester"), "{info}");
    assert_eq!(
        q(&mut f, &["CLIENT", "NOPE"]),
        Err("ERR unknown subcommand 'NOPE'. Try CLIENT HELP.".into())
    );
    let hello = ok(&mut f, &["HELLO", "3"]);
    assert!(
        matches!(&hello, Value::Map(pairs) if pairs.contains(&(bulk("proto"), Value::Int(3)))),
        "HELLO 3 answers a RESP3 map: {hello:?}"
    );
    assert_eq!(ok(&mut f, &["GET", "missing"]), Value::Nil, "RESP3's null");
    assert_eq!(
        q(&mut f, &["HELLO", "4"]),
        Err("NOPROTO unsupported protocol version".into())
    );
    assert!(matches!(ok(&mut f, &["HELLO", "2"]), Value::Array(_)));
    let info: String = redis::from_redis_value(&ok(&mut f, &["INFO"])).unwrap();
    assert!(
        info.contains("role:slave") && info.contains(&format!("leader_id:{leader}")),
        "{info}"
    );
    for field in ["term:", "commit_index:", "applied_index:", "redis_version:"] {
        assert!(info.contains(field), "INFO lacks {field}: {info}");
    }
    let info: String = redis::from_redis_value(&ok(&mut l, &["INFO", "replication"])).unwrap();
    assert!(
        info.contains("role:master") && !info.contains("redis_version"),
        "{info}"
    );
    assert!(matches!(ok(&mut f, &["COMMAND", "COUNT"]), Value::Int(n) if n >= 30));
    assert!(matches!(ok(&mut f, &["COMMAND", "DOCS", "get"]), Value::Array(a) if a.len() == 2));
    let get_info = ok(&mut f, &["COMMAND", "INFO", "get"]);
    let Value::Array(items) = get_info else {
        panic!("{get_info:?}")
    };
    assert!(matches!(&items[0], Value::Array(spec) if spec[1] == Value::Int(2)));
    assert_eq!(
        q(&mut f, &["FLUSHALL", "x"]),
        Err("ERR unknown command 'FLUSHALL', with args beginning with: 'x' ".into())
    );
    assert_eq!(
        ok(&mut f, &["PING"]),
        status("PONG"),
        "the connection stays usable"
    );
    assert_eq!(ok(&mut f, &["RESET"]), status("RESET"));
    assert_eq!(ok(&mut f, &["CLIENT", "GETNAME"]), Value::Nil);
    assert_eq!(ok(&mut f, &["QUIT"]), Value::Okay);
    assert!(q(&mut f, &["PING"]).is_err(), "QUIT closes the connection");

    resp3_clients_get_maps_and_nulls(&cluster, follower);
}

/// A client library in RESP3 mode (it sends `HELLO 3` as it connects), and the raw frames.
fn resp3_clients_get_maps_and_nulls(cluster: &Cluster, id: u64) {
    use std::io::{Read, Write};
    let port = cluster.resp_ports[(id - 1) as usize];
    let client =
        redis::Client::open(format!("redis://127.0.0.1:{port}/?protocol=resp3")).expect("a client");
    let mut con = client
        .get_connection_with_timeout(Duration::from_secs(10))
        .expect("a RESP3 connection");
    con.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    assert_eq!(ok(&mut con, &["SET", "r3", "v"]), Value::Okay);
    assert_eq!(
        ok(&mut con, &["MGET", "r3", "missing"]),
        Value::Array(vec![bulk("v"), Value::Nil])
    );
    assert_eq!(
        ok(&mut con, &["CONFIG", "GET", "save"]),
        Value::Map(Vec::new())
    );
    let docs = ok(&mut con, &["COMMAND", "DOCS", "get"]);
    assert!(
        matches!(&docs, Value::Map(pairs) if pairs.len() == 1
            && pairs[0].0 == bulk("get") && matches!(pairs[0].1, Value::Map(_))),
        "{docs:?}"
    );
    let hello = ok(&mut con, &["HELLO"]);
    assert!(
        matches!(&hello, Value::Map(pairs) if pairs.contains(&(bulk("proto"), Value::Int(3)))),
        "{hello:?}"
    );

    // The frames themselves: a map header, RESP3's null, and back to RESP2 after RESET.
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    raw.write_all(b"HELLO 3\r\nPING\r\n").unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"+PONG\r\n") {
        let mut chunk = [0u8; 4096];
        let n = raw.read(&mut chunk).expect("HELLO's reply");
        assert!(n > 0 && got.len() < 65536, "no PONG after HELLO: {got:?}");
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(
        got.starts_with(b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n"),
        "HELLO 3 answers a map: {}",
        String::from_utf8_lossy(&got)
    );
    let mut exchange = |request: &str, expected: &str| {
        raw.write_all(request.as_bytes()).unwrap();
        let mut got = vec![0u8; expected.len()];
        raw.read_exact(&mut got).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&got),
            expected,
            "reply to {request:?}"
        );
    };
    exchange("GET missing\r\n", "_\r\n");
    exchange("RESET\r\n", "+RESET\r\n");
    exchange("GET missing\r\n", "$-1\r\n");
}

#[test]
fn pipelines_counters_and_multi_key_writes_are_exact() {
    let mut cluster = Cluster::start("resp-pipelines", 3, "");
    let (_, follower) = follower_of(&mut cluster);
    let mut con = connect(&cluster, follower);

    // A pipeline of writes and reads, answered in order; reads see earlier writes.
    let mut pipe = redis::pipe();
    for i in 0..200 {
        pipe.cmd("SET").arg(format!("p{i}")).arg(i);
        pipe.cmd("APPEND").arg("log").arg(format!("{i},"));
        if i % 50 == 49 {
            pipe.cmd("GET").arg(format!("p{i}"));
        }
    }
    pipe.cmd("STRLEN").arg("log");
    let replies: Vec<Value> = pipe.query(&mut con).unwrap();
    assert_eq!(replies.len(), 200 * 2 + 4 + 1);
    let mut expected_len = 0;
    let mut at = 0;
    for i in 0..200 {
        assert_eq!(replies[at], Value::Okay);
        expected_len += format!("{i},").len() as i64;
        assert_eq!(replies[at + 1], Value::Int(expected_len));
        at += 2;
        if i % 50 == 49 {
            assert_eq!(replies[at], bulk(&i.to_string()));
            at += 1;
        }
    }
    assert_eq!(replies[at], Value::Int(expected_len));

    // INCR from many threads, on every node: the exact total.
    const THREADS: usize = 6;
    const EACH: i64 = 150;
    let ids = cluster.ids();
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let cluster = &cluster;
            let id = ids[t % ids.len()];
            scope.spawn(move || {
                let mut con = connect(cluster, id);
                for _ in 0..EACH {
                    ok(&mut con, &["INCR", "counter"]);
                }
            });
        }
    });
    assert_eq!(
        ok(&mut con, &["GET", "counter"]),
        bulk(&(THREADS as i64 * EACH).to_string())
    );

    // MSET is one entry: concurrent readers never see a and b differ.
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::scope(|scope| {
        let writer = {
            let stop = Arc::clone(&stop);
            let cluster = &cluster;
            scope.spawn(move || {
                let mut con = connect(cluster, ids[0]);
                for i in 0..300 {
                    let v = i.to_string();
                    ok(&mut con, &["MSET", "a", &v, "b", &v]);
                }
                stop.store(true, Ordering::SeqCst);
            })
        };
        for id in cluster.ids() {
            let stop = Arc::clone(&stop);
            let cluster = &cluster;
            scope.spawn(move || {
                let mut con = connect(cluster, id);
                let mut reads = 0;
                while !stop.load(Ordering::SeqCst) || reads == 0 {
                    let pair: (Option<String>, Option<String>) =
                        redis::from_redis_value(&ok(&mut con, &["MGET", "a", "b"])).unwrap();
                    assert_eq!(pair.0, pair.1, "MGET saw half of an MSET");
                    reads += 1;
                }
            });
        }
        writer.join().unwrap();
    });
    assert_eq!(ok(&mut con, &["DEL", "a", "b"]), Value::Int(2));
}

/// One recorded RESP client: GET/SET/APPEND on `x` and `y`, APPEND only on `log`, as the
/// checker reads them (with `reads_only`, GETs only: a reader stuck on a deposed leader
/// would see its stale values). A failed command (a timeout, or a connection broken by a killed
/// node) is recorded with its outcome unknown, and the client reconnects, to the next node.
fn resp_client(
    ports: &[u16],
    client: u64,
    stop: &AtomicBool,
    epoch: Instant,
    reads_only: bool,
) -> Recorded {
    let mut recorded = Recorded::default();
    let mut con: Option<redis::Connection> = None;
    let mut node = client as usize;
    let mut j = 0u64;
    let mut rng = kvstore_raft::raft::SplitMix64::new(client);
    while !stop.load(Ordering::SeqCst) {
        let Some(connection) = con.as_mut() else {
            node += 1;
            let port = ports[node % ports.len()];
            let redis_client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
            match redis_client.get_connection_with_timeout(Duration::from_secs(2)) {
                Ok(c) => {
                    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    con = Some(c);
                }
                Err(_) => sleep(Duration::from_millis(50)),
            }
            continue;
        };
        let key = ["x", "y"][rng.range(0, 2) as usize];
        let kind = if reads_only { 0 } else { rng.range(0, 4) };
        let (input, args): (KvInput, Vec<String>) = match kind {
            0 => (
                KvInput::Get { key: key.into() },
                vec!["GET".into(), key.into()],
            ),
            1 => {
                let value = format!("{client}-{j}");
                let input = KvInput::Put {
                    key: key.into(),
                    value: value.clone(),
                };
                (input, vec!["SET".into(), key.into(), value])
            }
            kind => {
                let key = if kind == 2 { key } else { "log" };
                let value = element(client, j);
                let input = KvInput::Append {
                    key: key.into(),
                    value: value.clone(),
                };
                (input, vec!["APPEND".into(), key.into(), value])
            }
        };
        j += 1;
        let call_us = epoch.elapsed().as_micros() as u64;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let result = q(connection, &args);
        let return_us = kvstore_raft::check::return_stamp_us(epoch);
        let output = match (&input, result) {
            (KvInput::Get { .. }, Ok(Value::Nil)) => Some(KvOutput::Get { value: None }),
            (KvInput::Get { .. }, Ok(Value::BulkString(v))) => Some(KvOutput::Get {
                value: Some(String::from_utf8(v).unwrap()),
            }),
            (KvInput::Put { .. }, Ok(Value::Okay)) => Some(KvOutput::Put),
            (KvInput::Append { .. }, Ok(Value::Int(_))) => Some(KvOutput::Append),
            (_, Ok(other)) => panic!("{args:?} answered {other:?}"),
            (_, Err(error)) => {
                assert!(
                    error.starts_with("TIMEOUT") || error.starts_with('?'),
                    "{args:?}: an error other than an unknown outcome: {error}"
                );
                con = None;
                None
            }
        };
        if let (KvInput::Append { key, value }, Some(_)) = (&input, &output) {
            recorded
                .acked_appends
                .push((key.clone(), client, value.clone()));
        }
        recorded.ops.push(Operation {
            client_id: client,
            input,
            call_us,
            return_us: output.as_ref().map(|_| return_us),
            output,
        });
    }
    recorded
}

#[test]
fn histories_through_resp_stay_linearizable_when_the_leader_dies_or_hangs() {
    const NEW_LEADER: Duration = Duration::from_secs(10);
    let mut cluster = Cluster::start("resp-faults", 3, "");
    cluster.wait_leader(FIRST_LEADER);
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (1..=4u64)
        .map(|client| {
            let (ports, stop) = (cluster.resp_ports.clone(), Arc::clone(&stop));
            std::thread::spawn(move || resp_client(&ports, client, &stop, epoch, false))
        })
        .collect();
    sleep(Duration::from_secs(1));
    let (leader, _) = cluster.wait_leader(NEW_LEADER);
    cluster.kill(leader);
    sleep(Duration::from_secs(2));
    cluster.start_node(leader);
    let (leader, _) = cluster.wait_leader(NEW_LEADER);
    sleep(Duration::from_secs(1));
    cluster.pause(leader);
    sleep(Duration::from_secs(2));
    cluster.resume(leader);
    cluster.wait_leader(NEW_LEADER);
    sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let mut all = Recorded::default();
    for client in clients {
        all.merge(client.join().expect("a client thread"));
    }
    let unknown = all.ops.len() - all.known_ops();
    eprintln!(
        "resp-faults: {} operations, {unknown} with an unknown outcome, {} acknowledged appends to log",
        all.ops.len(),
        all.acked_for("log").len()
    );
    cluster.wait_leader(NEW_LEADER);
    judge(&all, &cluster, 1, "resp-faults");
}

/// Every acknowledged APPEND to `log` once in its final value (read through node `id`),
/// enough progress to judge, and a linearizable history.
fn judge(all: &Recorded, cluster: &Cluster, id: u64, name: &str) {
    let mut con = connect(cluster, id);
    let log: Option<String> = redis::from_redis_value(&ok(&mut con, &["GET", "log"])).unwrap();
    all.assert_appends("log", &log.unwrap_or_default());
    assert!(
        all.known_ops() >= 40 && !all.acked_for("log").is_empty(),
        "too little progress to judge: {} operations answered",
        all.known_ops()
    );
    all.assert_linearizable(name);
}

/// A real network partition (loopback proxies between the nodes, cut by the test): the
/// leader is cut off from both followers — Raft traffic and forwarded client commands alike
/// — while concurrent Redis clients on every node keep going; then healed, and then a
/// follower is cut off. The history must be linearizable (no stale read from the deposed
/// leader, no lost or doubled write) and every acknowledged APPEND in the final value once;
/// the majority side must make progress while the old leader is cut off.
#[test]
fn histories_through_resp_stay_linearizable_across_a_network_partition() {
    const NEW_LEADER: Duration = Duration::from_secs(10);
    let (mut cluster, proxies) =
        Cluster::start_behind_proxies("resp-partition", 3, r#""request_timeout_ms":1500,"#);
    let (leader, _) = cluster.wait_leader(FIRST_LEADER);
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    // Four clients of every kind of command, and three readers, one starting on each node.
    let clients: Vec<_> = (1..=7u64)
        .map(|client| {
            let (ports, stop) = (cluster.resp_ports.clone(), Arc::clone(&stop));
            std::thread::spawn(move || resp_client(&ports, client, &stop, epoch, client > 4))
        })
        .collect();
    sleep(Duration::from_secs(1));
    proxies.isolate(leader);
    let cut_us = epoch.elapsed().as_micros() as u64;
    // The majority elects a leader of its own; the test sees every node (real ports).
    let majority_leader = cluster.wait_for("a leader on the majority side", NEW_LEADER, |s| {
        s.iter()
            .find(|n| n.id != leader && n.role == "leader")
            .map(|n| n.id)
    });
    sleep(Duration::from_secs(2));
    let healed_us = epoch.elapsed().as_micros() as u64;
    proxies.heal();
    cluster.wait_leader(NEW_LEADER);
    sleep(Duration::from_secs(1));
    let follower = cluster
        .ids()
        .into_iter()
        .find(|&id| id != majority_leader && id != leader)
        .unwrap();
    proxies.isolate(follower);
    sleep(Duration::from_secs(2));
    proxies.heal();
    cluster.wait_leader(NEW_LEADER);
    sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let mut all = Recorded::default();
    for client in clients {
        all.merge(client.join().expect("a client thread"));
    }
    let during_cut = all
        .ops
        .iter()
        .filter(|op| op.call_us > cut_us && op.return_us.is_some_and(|r| r < healed_us))
        .count();
    let unknown = all.ops.len() - all.known_ops();
    eprintln!(
        "resp-partition: {} operations ({during_cut} answered while node {leader} was cut \
         off), {unknown} with an unknown outcome, {} acknowledged appends to log",
        all.ops.len(),
        all.acked_for("log").len()
    );
    assert!(
        during_cut > 0,
        "no command was answered while the old leader was cut off: the majority made no progress"
    );
    judge(&all, &cluster, majority_leader, "resp-partition");
    drop(cluster);
    drop(proxies);
}

/// The commands of `pipelined_mixes_answer_as_a_sequential_run_would`, with the replies a
/// sequential run gives (a model of Redis's string commands on a few keys).
fn mixed_commands(seed: u64, count: usize) -> Vec<(Vec<String>, Value)> {
    use std::collections::HashMap;
    let mut rng = kvstore_raft::raft::SplitMix64::new(seed);
    let mut model: HashMap<String, String> = HashMap::new();
    let keys = ["m0", "m1", "m2", "c0", "c1"];
    let mut out = Vec::new();
    for j in 0..count {
        let key = keys[rng.range(0, keys.len() as u64) as usize].to_string();
        let other = keys[rng.range(0, keys.len() as u64) as usize].to_string();
        let get =
            |model: &HashMap<String, String>, k: &str| model.get(k).map_or(Value::Nil, |v| bulk(v));
        let text_key = keys[rng.range(0, 3) as usize].to_string();
        let (args, reply) = match rng.range(0, 9) {
            0 => {
                let key = text_key;
                let value = format!("v{j}");
                model.insert(key.clone(), value.clone());
                (vec!["SET".into(), key, value], Value::Okay)
            }
            1 | 2 => (vec!["GET".into(), key.clone()], get(&model, &key)),
            3 => {
                // Counters only on c0 and c1, which SET and APPEND leave alone: every INCR
                // succeeds (an error reply would end the pipeline's query early).
                let key = ["c0", "c1"][rng.range(0, 2) as usize].to_string();
                let n = model.get(&key).map_or(0, |v| v.parse::<i64>().unwrap()) + 1;
                model.insert(key.clone(), n.to_string());
                (vec!["INCR".into(), key], Value::Int(n))
            }
            4 => {
                let key = text_key;
                let value = model.entry(key.clone()).or_default();
                value.push_str(&format!("a{j}"));
                let len = value.len() as i64;
                (vec!["APPEND".into(), key, format!("a{j}")], Value::Int(len))
            }
            5 => {
                let existed = model.remove(&key).is_some();
                (vec!["DEL".into(), key], Value::Int(i64::from(existed)))
            }
            6 => {
                let len = model.get(&key).map_or(0, |v| v.len() as i64);
                (vec!["STRLEN".into(), key], Value::Int(len))
            }
            7 => {
                let reply = Value::Array(vec![get(&model, &key), get(&model, &other)]);
                (vec!["MGET".into(), key, other], reply)
            }
            _ => {
                let count =
                    i64::from(model.contains_key(&key)) + i64::from(model.contains_key(&other));
                (vec!["EXISTS".into(), key, other], Value::Int(count))
            }
        };
        out.push((args, reply));
    }
    out
}

/// A pipeline mixing writes and reads on one connection (to the leader, where reads are
/// answered from the applied state before it reaches the engine, and to a follower) gets
/// its replies in order, each equal to what a sequential run of the same commands gives.
#[test]
fn pipelined_mixes_answer_as_a_sequential_run_would() {
    let mut cluster = Cluster::start("resp-mixes", 3, "");
    let (leader, follower) = follower_of(&mut cluster);
    for (round, id) in [leader, follower, leader].into_iter().enumerate() {
        let mut con = connect(&cluster, id);
        ok(&mut con, &["DEL", "m0", "m1", "m2", "c0", "c1"]);
        let commands = mixed_commands(round as u64 + 1, 400);
        let mut pipe = redis::pipe();
        for (args, _) in &commands {
            let cmd = pipe.cmd(&args[0]);
            for arg in &args[1..] {
                cmd.arg(arg);
            }
        }
        let replies: Vec<Value> = pipe.query::<Vec<Value>>(&mut con).unwrap_or_else(|e| {
            panic!("the pipeline of round {round} failed: {e}");
        });
        assert_eq!(replies.len(), commands.len());
        for (k, ((args, expected), reply)) in commands.iter().zip(&replies).enumerate() {
            assert_eq!(
                reply, expected,
                "round {round} (node {id}), command {k} {args:?}: pipelined reply differs \
                 from the sequential run"
            );
        }
    }
}
