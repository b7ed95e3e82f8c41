//! What each Redis command does here: answered by the connection itself (PING, ECHO,
//! CLIENT, INFO, COMMAND, HELLO, ...), or turned into a write or a read of the KV service
//! (src/kv/redis_ops.rs). Arity, syntax and error texts follow redis-server 7, so client
//! libraries see the replies and errors they expect.

use std::collections::HashMap;

use super::RespContext;
use crate::kv::redis_ops::{parse_i64, RedisReply, RedisWrite};
use crate::proto::kvstore::{read_op, ReadOp};
use crate::raft::Role;

/// The version reported to clients: the Redis command set this server follows.
pub const REDIS_VERSION: &str = "7.0.0";
/// SCAN cursors one connection keeps; the oldest is forgotten first.
const MAX_CURSORS: usize = 1024;

/// How a command is carried out.
#[derive(Debug)]
pub enum Action {
    /// Answered by the connection, at once.
    Reply(RedisReply),
    /// A write of the KV service; `Shape` turns its reply into the command's.
    Write(RedisWrite, Shape),
    /// A read of the KV service.
    Read(ReadOp, Shape),
    /// Answer +OK, then close the connection.
    Quit,
}

/// How an op's reply becomes the command's reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Same,
    /// SETNX: a SET NX's OK is 1, its nil 0.
    Flag,
    /// SCAN: the op's next key becomes a cursor number of this connection.
    Scan,
}

/// What a connection remembers between commands.
pub struct ConnState {
    pub id: u64,
    pub peer: String,
    pub name: Option<Vec<u8>>,
    /// True once AUTH succeeded, or from the start when the cluster has no client token.
    pub authed: bool,
    /// The RESP version the client chose with HELLO: 2 (the default) or 3.
    pub proto: u8,
    /// SCAN cursor number -> the last key the scan returned.
    cursors: HashMap<u64, Vec<u8>>,
    next_cursor: u64,
}

impl ConnState {
    pub fn new(id: u64, peer: String, needs_auth: bool) -> ConnState {
        ConnState {
            id,
            peer,
            name: None,
            authed: !needs_auth,
            proto: 2,
            cursors: HashMap::new(),
            next_cursor: 1,
        }
    }

    fn reset(&mut self, needs_auth: bool) {
        self.name = None;
        self.authed = !needs_auth;
        self.proto = 2;
        self.cursors.clear();
    }

    /// A SCAN op's reply `[next key or nil, keys]` as Redis's `[cursor, keys]`.
    pub fn scan_reply(&mut self, reply: RedisReply) -> RedisReply {
        let RedisReply::Array(mut parts) = reply else {
            return reply;
        };
        if parts.len() != 2 {
            return RedisReply::Array(parts);
        }
        let keys = parts.pop().expect("two parts");
        let cursor = match parts.pop().expect("two parts") {
            RedisReply::Bulk(last) => {
                if self.cursors.len() >= MAX_CURSORS {
                    let oldest = *self.cursors.keys().min().expect("not empty");
                    self.cursors.remove(&oldest);
                }
                let number = self.next_cursor;
                self.next_cursor += 1;
                self.cursors.insert(number, last);
                number
            }
            _ => 0,
        };
        RedisReply::Array(vec![
            RedisReply::Bulk(cursor.to_string().into_bytes()),
            keys,
        ])
    }
}

fn error(text: impl Into<String>) -> Action {
    Action::Reply(RedisReply::Error(text.into()))
}

fn arity_error(name: &str) -> Action {
    error(format!(
        "ERR wrong number of arguments for '{name}' command"
    ))
}

fn syntax_error() -> Action {
    error("ERR syntax error")
}

fn ok() -> Action {
    Action::Reply(RedisReply::Ok)
}

fn read(kind: read_op::Kind, keys: &[Vec<u8>]) -> Action {
    let mut op = ReadOp::new();
    op.kind = kind.into();
    op.keys = keys.to_vec();
    Action::Read(op, Shape::Same)
}

/// One command of the table: name, arity (negative: at least), flags, first key, last
/// key, key step, group, summary — what COMMAND INFO and COMMAND DOCS describe.
type Spec = (
    &'static str,
    i64,
    &'static [&'static str],
    i64,
    i64,
    i64,
    &'static str,
    &'static str,
);

const COMMANDS: &[Spec] = &[
    (
        "ping",
        -1,
        &["fast"],
        0,
        0,
        0,
        "connection",
        "Returns the server's liveliness response.",
    ),
    (
        "echo",
        2,
        &["fast"],
        0,
        0,
        0,
        "connection",
        "Returns the given string.",
    ),
    (
        "get",
        2,
        &["readonly", "fast"],
        1,
        1,
        1,
        "string",
        "Returns the string value of a key.",
    ),
    (
        "set",
        -3,
        &["write", "denyoom"],
        1,
        1,
        1,
        "string",
        "Sets the string value of a key (NX, XX, GET; no expiry).",
    ),
    (
        "setnx",
        3,
        &["write", "denyoom", "fast"],
        1,
        1,
        1,
        "string",
        "Set the string value of a key only when the key doesn't exist.",
    ),
    (
        "getset",
        3,
        &["write", "denyoom", "fast"],
        1,
        1,
        1,
        "string",
        "Returns the previous string value of a key after setting it to a new value.",
    ),
    (
        "getdel",
        2,
        &["write", "fast"],
        1,
        1,
        1,
        "string",
        "Returns the string value of a key after deleting the key.",
    ),
    (
        "append",
        3,
        &["write", "denyoom", "fast"],
        1,
        1,
        1,
        "string",
        "Appends a string to the value of a key. Creates the key if it doesn't exist.",
    ),
    (
        "strlen",
        2,
        &["readonly", "fast"],
        1,
        1,
        1,
        "string",
        "Returns the length of a string value.",
    ),
    (
        "del",
        -2,
        &["write"],
        1,
        -1,
        1,
        "generic",
        "Deletes one or more keys.",
    ),
    (
        "exists",
        -2,
        &["readonly", "fast"],
        1,
        -1,
        1,
        "generic",
        "Determines whether one or more keys exist.",
    ),
    (
        "incr",
        2,
        &["write", "denyoom", "fast"],
        1,
        1,
        1,
        "string",
        "Increments the integer value of a key by one.",
    ),
    (
        "incrby",
        3,
        &["write", "denyoom", "fast"],
        1,
        1,
        1,
        "string",
        "Increments the integer value of a key by a number.",
    ),
    (
        "decr",
        2,
        &["write", "denyoom", "fast"],
        1,
        1,
        1,
        "string",
        "Decrements the integer value of a key by one.",
    ),
    (
        "decrby",
        3,
        &["write", "denyoom", "fast"],
        1,
        1,
        1,
        "string",
        "Decrements a number from the integer value of a key.",
    ),
    (
        "mget",
        -2,
        &["readonly", "fast"],
        1,
        -1,
        1,
        "string",
        "Atomically returns the string values of one or more keys.",
    ),
    (
        "mset",
        -3,
        &["write", "denyoom"],
        1,
        -1,
        2,
        "string",
        "Atomically creates or modifies the string values of one or more keys.",
    ),
    (
        "msetnx",
        -3,
        &["write", "denyoom"],
        1,
        -1,
        2,
        "string",
        "Atomically sets the values of one or more keys only when all keys don't exist.",
    ),
    (
        "dbsize",
        1,
        &["readonly"],
        0,
        0,
        0,
        "server",
        "Returns the number of keys in the database.",
    ),
    (
        "scan",
        -2,
        &["readonly"],
        0,
        0,
        0,
        "generic",
        "Iterates over the key names in the database.",
    ),
    (
        "keys",
        2,
        &["readonly"],
        0,
        0,
        0,
        "generic",
        "Returns all key names that match a pattern.",
    ),
    (
        "type",
        2,
        &["readonly", "fast"],
        1,
        1,
        1,
        "generic",
        "Determines the type of value stored at a key.",
    ),
    (
        "info",
        -1,
        &["loading", "stale"],
        0,
        0,
        0,
        "server",
        "Returns information and statistics about the server.",
    ),
    (
        "command",
        -1,
        &["loading", "stale"],
        0,
        0,
        0,
        "server",
        "Returns detailed information about all commands.",
    ),
    (
        "client",
        -2,
        &["loading", "stale"],
        0,
        0,
        0,
        "connection",
        "A container for client connection commands.",
    ),
    (
        "select",
        2,
        &["loading", "stale", "fast"],
        0,
        0,
        0,
        "connection",
        "Changes the selected database (only 0 exists).",
    ),
    (
        "quit",
        -1,
        &["loading", "stale", "fast"],
        0,
        0,
        0,
        "connection",
        "Closes the connection.",
    ),
    (
        "reset",
        1,
        &["loading", "stale", "fast"],
        0,
        0,
        0,
        "connection",
        "Resets the connection.",
    ),
    (
        "hello",
        -1,
        &["loading", "stale", "fast"],
        0,
        0,
        0,
        "connection",
        "Handshakes with the server (RESP2 only).",
    ),
    (
        "auth",
        -2,
        &["loading", "stale", "fast"],
        0,
        0,
        0,
        "connection",
        "Authenticates the connection (the cluster's client_token).",
    ),
    (
        "config",
        -2,
        &["loading", "stale"],
        0,
        0,
        0,
        "server",
        "CONFIG GET answers an empty list (nothing is configurable here).",
    ),
];

fn spec(name: &str) -> Option<&'static Spec> {
    COMMANDS.iter().find(|spec| spec.0 == name)
}

/// Decides what `args` (never empty) does, given and updating the connection's state.
pub fn classify(args: &[Vec<u8>], state: &mut ConnState, ctx: &RespContext) -> Action {
    let name = String::from_utf8_lossy(&args[0]).to_lowercase();
    let Some(&(_, arity, ..)) = spec(&name) else {
        let mut text = format!(
            "ERR unknown command '{}', with args beginning with: ",
            printable(&args[0])
        );
        for arg in args.iter().skip(1).take(20) {
            text.push_str(&format!("'{}' ", printable(arg)));
        }
        return error(text);
    };
    let count = args.len() as i64;
    if (arity >= 0 && count != arity) || (arity < 0 && count < -arity) {
        return arity_error(&name);
    }
    let needs_auth = ctx.config.client_token.is_some();
    if !state.authed && !matches!(name.as_str(), "auth" | "hello" | "quit" | "reset") {
        return error("NOAUTH Authentication required.");
    }
    let a = &args[1..];
    match name.as_str() {
        "ping" => match a {
            [] => Action::Reply(RedisReply::Status("PONG".into())),
            [message] => Action::Reply(RedisReply::Bulk(message.clone())),
            _ => arity_error(&name),
        },
        "echo" => Action::Reply(RedisReply::Bulk(a[0].clone())),
        "get" => read(read_op::Kind::GET, a),
        "strlen" => read(read_op::Kind::STRLEN, a),
        "exists" => read(read_op::Kind::EXISTS, a),
        "mget" => read(read_op::Kind::MGET, a),
        "type" => read(read_op::Kind::TYPE, a),
        "dbsize" => read(read_op::Kind::DBSIZE, &[]),
        "keys" => {
            let mut op = ReadOp::new();
            op.kind = read_op::Kind::KEYS.into();
            op.pattern = a[0].clone();
            Action::Read(op, Shape::Same)
        }
        "scan" => scan(a, state),
        "set" => set(a),
        "setnx" => Action::Write(
            RedisWrite::Set {
                key: a[0].clone(),
                value: a[1].clone(),
                nx: true,
                xx: false,
                get: false,
            },
            Shape::Flag,
        ),
        "getset" => write(RedisWrite::Set {
            key: a[0].clone(),
            value: a[1].clone(),
            nx: false,
            xx: false,
            get: true,
        }),
        "getdel" => write(RedisWrite::GetDel { key: a[0].clone() }),
        "append" => write(RedisWrite::Append {
            key: a[0].clone(),
            value: a[1].clone(),
        }),
        "del" => write(RedisWrite::Del(a.to_vec())),
        "incr" | "decr" | "incrby" | "decrby" => {
            let amount = match a.get(1) {
                None => 1,
                Some(text) => match parse_i64(text) {
                    Some(n) => n,
                    None => return error(crate::kv::redis_ops::NOT_AN_INTEGER),
                },
            };
            let delta = if name.starts_with("decr") {
                match amount.checked_neg() {
                    Some(n) => n,
                    None => return error("ERR decrement would overflow"),
                }
            } else {
                amount
            };
            write(RedisWrite::IncrBy {
                key: a[0].clone(),
                delta,
            })
        }
        "mset" | "msetnx" => {
            if !a.len().is_multiple_of(2) {
                return arity_error(&name);
            }
            let pairs = a
                .chunks(2)
                .map(|pair| (pair[0].clone(), pair[1].clone()))
                .collect();
            write(if name == "mset" {
                RedisWrite::MSet(pairs)
            } else {
                RedisWrite::MSetNx(pairs)
            })
        }
        "select" => match parse_i64(&a[0]) {
            Some(0) => ok(),
            Some(_) => error("ERR DB index is out of range"),
            None => error("ERR value is not an integer or out of range"),
        },
        "quit" => Action::Quit,
        "reset" => {
            state.reset(needs_auth);
            Action::Reply(RedisReply::Status("RESET".into()))
        }
        "auth" => auth(a, state, ctx),
        "hello" => hello(a, state, ctx),
        "client" => client(a, state),
        "info" => Action::Reply(RedisReply::Bulk(info(ctx, a).into_bytes())),
        "command" => command(a),
        "config" => match String::from_utf8_lossy(&a[0]).to_lowercase().as_str() {
            "get" => Action::Reply(RedisReply::Map(Vec::new())),
            _ => error(format!(
                "ERR unknown subcommand '{}'. Try CONFIG HELP.",
                printable(&a[0])
            )),
        },
        _ => unreachable!("every command of the table is handled"),
    }
}

fn write(op: RedisWrite) -> Action {
    Action::Write(op, Shape::Same)
}

/// An argument as it may appear in an error line: no control characters, at most 128.
fn printable(arg: &[u8]) -> String {
    String::from_utf8_lossy(&arg[..arg.len().min(128)])
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn set(a: &[Vec<u8>]) -> Action {
    let (mut nx, mut xx, mut get) = (false, false, false);
    for option in &a[2..] {
        match String::from_utf8_lossy(option).to_uppercase().as_str() {
            "NX" if !xx => nx = true,
            "XX" if !nx => xx = true,
            "GET" => get = true,
            "EX" | "PX" | "EXAT" | "PXAT" | "KEEPTTL" => {
                return error(
                    "ERR expiry (EX, PX, EXAT, PXAT, KEEPTTL) is not supported: \
                     keys of kvstore-raft do not expire",
                )
            }
            _ => return syntax_error(),
        }
    }
    write(RedisWrite::Set {
        key: a[0].clone(),
        value: a[1].clone(),
        nx,
        xx,
        get,
    })
}

fn scan(a: &[Vec<u8>], state: &mut ConnState) -> Action {
    let mut op = ReadOp::new();
    op.kind = read_op::Kind::SCAN.into();
    op.count = 10;
    match parse_i64(&a[0]).and_then(|n| u64::try_from(n).ok()) {
        Some(0) => {}
        Some(cursor) => match state.cursors.get(&cursor) {
            Some(last) => {
                op.after = last.clone();
                op.has_after = true;
            }
            None => {
                return error(
                    "ERR invalid cursor (SCAN cursors belong to the connection that got them)",
                )
            }
        },
        None => return error("ERR invalid cursor"),
    }
    let mut options = a[1..].iter();
    while let Some(option) = options.next() {
        let Some(value) = options.next() else {
            return syntax_error();
        };
        match String::from_utf8_lossy(option).to_uppercase().as_str() {
            "MATCH" => op.pattern = value.clone(),
            "COUNT" => match parse_i64(value) {
                Some(n) if n >= 1 => op.count = n as u64,
                Some(_) => return syntax_error(),
                None => return error(crate::kv::redis_ops::NOT_AN_INTEGER),
            },
            // Every key is a string: TYPE string keeps all, any other type none.
            "TYPE" => {
                if !value.eq_ignore_ascii_case(b"string") {
                    op.pattern = b"[]".to_vec();
                }
            }
            _ => return syntax_error(),
        }
    }
    Action::Read(op, Shape::Scan)
}

fn auth(a: &[Vec<u8>], state: &mut ConnState, ctx: &RespContext) -> Action {
    let Some(token) = &ctx.config.client_token else {
        return error(
            "ERR AUTH <password> called without any password configured for the default user. \
             Are you sure your configuration is correct?",
        );
    };
    let presented = match a {
        [password] => password,
        [_user, password] => password,
        _ => return syntax_error(),
    };
    if crate::rpc::handshake::constant_time_eq(presented, token.as_bytes()) {
        state.authed = true;
        ok()
    } else {
        error("WRONGPASS invalid username-password pair or user is disabled.")
    }
}

fn hello(a: &[Vec<u8>], state: &mut ConnState, ctx: &RespContext) -> Action {
    let mut rest = a.iter();
    let mut proto = state.proto;
    if let Some(version) = rest.next() {
        proto = match parse_i64(version) {
            Some(2) => 2,
            Some(3) => 3,
            Some(_) => return error("NOPROTO unsupported protocol version"),
            None => return error("ERR Protocol version is not an integer or out of range"),
        };
    }
    while let Some(option) = rest.next() {
        match String::from_utf8_lossy(option).to_uppercase().as_str() {
            "AUTH" => {
                let (Some(user), Some(password)) = (rest.next(), rest.next()) else {
                    return syntax_error();
                };
                if let Action::Reply(RedisReply::Error(e)) =
                    auth(&[user.clone(), password.clone()], state, ctx)
                {
                    return error(e);
                }
            }
            "SETNAME" => {
                let Some(name) = rest.next() else {
                    return syntax_error();
                };
                state.name = Some(name.clone());
            }
            _ => return syntax_error(),
        }
    }
    if !state.authed {
        return error("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time");
    }
    // The version switches only once the client is known: the reply is in the new one.
    state.proto = proto;
    let bulk = |s: &str| RedisReply::Bulk(s.as_bytes().to_vec());
    let role = if ctx.node.status().role == Role::Leader {
        "master"
    } else {
        "replica"
    };
    Action::Reply(RedisReply::Map(vec![
        (bulk("server"), bulk("redis")),
        (bulk("version"), bulk(REDIS_VERSION)),
        (bulk("proto"), RedisReply::Int(i64::from(proto))),
        (bulk("id"), RedisReply::Int(state.id as i64)),
        (bulk("mode"), bulk("standalone")),
        (bulk("role"), bulk(role)),
        (bulk("modules"), RedisReply::Array(Vec::new())),
    ]))
}

fn client(a: &[Vec<u8>], state: &mut ConnState) -> Action {
    let sub = String::from_utf8_lossy(&a[0]).to_lowercase();
    match (sub.as_str(), &a[1..]) {
        ("setname", [name]) => {
            if name.iter().any(|&b| b <= b' ' || b > b'~') {
                return error(
                    "ERR Client names cannot contain spaces, newlines or special characters.",
                );
            }
            state.name = (!name.is_empty()).then(|| name.clone());
            ok()
        }
        ("getname", []) => {
            Action::Reply(state.name.clone().map_or(RedisReply::Nil, RedisReply::Bulk))
        }
        ("id", []) => Action::Reply(RedisReply::Int(state.id as i64)),
        ("info", []) => Action::Reply(RedisReply::Bulk(client_line(state).into_bytes())),
        // Client libraries announce themselves (redis-py 5 does); nothing to keep.
        ("setinfo", [_, _]) => ok(),
        ("setname" | "getname" | "id" | "info" | "setinfo", _) => error(format!(
            "ERR wrong number of arguments for 'client|{sub}' command"
        )),
        _ => error(format!(
            "ERR unknown subcommand '{}'. Try CLIENT HELP.",
            printable(&a[0])
        )),
    }
}

fn client_line(state: &ConnState) -> String {
    let name = state
        .name
        .as_deref()
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .unwrap_or_default();
    format!(
        "id={} addr={} name={name} db=0 resp=2 cmd=client|info\n",
        state.id, state.peer
    )
}

/// INFO: the sections named (server, replication, keyspace), or all of them.
fn info(ctx: &RespContext, sections: &[Vec<u8>]) -> String {
    let all = sections.is_empty()
        || sections.iter().any(|s| {
            matches!(
                String::from_utf8_lossy(s).to_lowercase().as_str(),
                "all" | "everything" | "default"
            )
        });
    let wanted = |name: &str| {
        all || sections
            .iter()
            .any(|s| s.eq_ignore_ascii_case(name.as_bytes()))
    };
    let text = all_info(ctx);
    text.split("\r\n\r\n")
        .filter(|section| {
            let title = section.lines().next().unwrap_or_default();
            wanted(title.trim_start_matches("# "))
        })
        .map(|section| format!("{section}\r\n\r\n"))
        .collect()
}

fn all_info(ctx: &RespContext) -> String {
    let status = ctx.node.status();
    let role = if status.role == Role::Leader {
        "master"
    } else {
        "slave"
    };
    format!(
        "# Server\r\nredis_version:{REDIS_VERSION}\r\nredis_mode:standalone\r\n\
         server_name:kvstore-raft\r\nkvstore_raft_version:{}\r\nprocess_id:{}\r\n\
         tcp_port:{}\r\nnode_id:{}\r\n\r\n\
         # Replication\r\nrole:{role}\r\nraft_role:{}\r\nleader_id:{}\r\nterm:{}\r\n\
         commit_index:{}\r\napplied_index:{}\r\nlast_index:{}\r\nconnected_slaves:0\r\n\r\n\
         # Keyspace\r\n",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        ctx.local_addr.port(),
        ctx.id,
        status.role.as_str(),
        status.leader,
        status.term,
        status.commit,
        status.applied,
        status.last_index,
    )
}

fn command_info(spec: &Spec) -> RedisReply {
    let (name, arity, flags, first, last, step, ..) = *spec;
    RedisReply::Array(vec![
        RedisReply::Bulk(name.as_bytes().to_vec()),
        RedisReply::Int(arity),
        RedisReply::Array(
            flags
                .iter()
                .map(|f| RedisReply::Status((*f).to_string()))
                .collect(),
        ),
        RedisReply::Int(first),
        RedisReply::Int(last),
        RedisReply::Int(step),
    ])
}

fn command_docs(spec: &Spec) -> (RedisReply, RedisReply) {
    let bulk = |s: &str| RedisReply::Bulk(s.as_bytes().to_vec());
    let (name, .., group, summary) = *spec;
    (
        bulk(name),
        RedisReply::Map(vec![
            (bulk("summary"), bulk(summary)),
            (bulk("since"), bulk("1.0.0")),
            (bulk("group"), bulk(group)),
        ]),
    )
}

fn command(a: &[Vec<u8>]) -> Action {
    let sub = a.first().map(|s| String::from_utf8_lossy(s).to_lowercase());
    let named = |names: &[Vec<u8>]| -> Vec<Option<&'static Spec>> {
        names
            .iter()
            .map(|n| spec(&String::from_utf8_lossy(n).to_lowercase()))
            .collect()
    };
    let reply = match sub.as_deref() {
        None => RedisReply::Array(COMMANDS.iter().map(command_info).collect()),
        Some("count") => RedisReply::Int(COMMANDS.len() as i64),
        Some("info") => RedisReply::Array(
            named(&a[1..])
                .into_iter()
                .map(|s| s.map_or(RedisReply::Nil, command_info))
                .collect(),
        ),
        Some("docs") => {
            let specs: Vec<&Spec> = if a.len() == 1 {
                COMMANDS.iter().collect()
            } else {
                named(&a[1..]).into_iter().flatten().collect()
            };
            RedisReply::Map(specs.into_iter().map(command_docs).collect())
        }
        Some("list") => RedisReply::Array(
            COMMANDS
                .iter()
                .map(|s| RedisReply::Bulk(s.0.as_bytes().to_vec()))
                .collect(),
        ),
        Some(other) => {
            return error(format!(
                "ERR unknown subcommand '{other}'. Try COMMAND HELP."
            ))
        }
    };
    Action::Reply(reply)
}
