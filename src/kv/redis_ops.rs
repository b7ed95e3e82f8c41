//! The operations of the Redis command set (src/resp/) as the state machine
//! and the read path see them: protocol-neutral values with Redis's reply
//! shapes and error texts, so that the wire (RESP) only parses and encodes.
//!
//! Writes ([`RedisWrite`]) travel in one log entry per batch (a `REDIS`
//! command) and are applied in order by [`apply_writes`]; each op is all or
//! nothing (MSET, MSETNX and DEL of many keys change every key or none), and
//! counters are one op (no read-modify-write race between clients). Reads
//! ([`execute_reads`]) run on a consistent [`EngineView`] taken once the
//! read's linearizable barrier has passed, on the requesting thread: never on
//! the event loop or the apply thread, so a SCAN or KEYS costs the cluster's
//! Raft threads nothing.

use protobuf::{EnumOrUnknown, Message};

use super::engine::{EngineError, EngineView};
use crate::proto::kvstore::{op_reply, read_op, write_op, ExecReply, OpReply, ReadOp, WriteOp};

/// Redis's error for a value that does not parse as a 64-bit integer.
pub const NOT_AN_INTEGER: &str = "ERR value is not an integer or out of range";
/// Redis's error for a counter that would leave the 64-bit range.
pub const OVERFLOW: &str = "ERR increment or decrement would overflow";
/// KEYS answers at most this many keys; past it the client is told to SCAN.
pub const MAX_KEYS_REPLY: usize = 100_000;
/// One SCAN call visits at most this many keys, whatever its COUNT.
pub const MAX_SCAN_COUNT: usize = 10_000;

const SET_NX: u32 = 1;
const SET_XX: u32 = 2;
const SET_GET: u32 = 4;

/// Keys with their values, in order.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// A write of the Redis command set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisWrite {
    Set {
        key: Vec<u8>,
        value: Vec<u8>,
        nx: bool,
        xx: bool,
        get: bool,
    },
    MSet(Pairs),
    MSetNx(Pairs),
    Del(Vec<Vec<u8>>),
    IncrBy {
        key: Vec<u8>,
        delta: i64,
    },
    Append {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    GetDel {
        key: Vec<u8>,
    },
}

/// The answer to one op, shaped like a Redis reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisReply {
    Ok,
    Nil,
    Int(i64),
    Bulk(Vec<u8>),
    /// The whole error line without the leading '-', e.g. "ERR ...".
    Error(String),
    Array(Vec<RedisReply>),
    Status(String),
    /// Keys and their values: a map for a RESP3 client (HELLO 3), a flat array of key,
    /// value, key, value, ... for a RESP2 one and between nodes.
    Map(Vec<(RedisReply, RedisReply)>),
}

impl RedisWrite {
    pub fn to_proto(&self) -> WriteOp {
        let mut op = WriteOp::default();
        let pairs = |op: &mut WriteOp, pairs: &[(Vec<u8>, Vec<u8>)]| {
            for (key, value) in pairs {
                op.keys.push(key.clone());
                op.values.push(value.clone());
            }
        };
        let kind = match self {
            RedisWrite::Set {
                key,
                value,
                nx,
                xx,
                get,
            } => {
                op.keys.push(key.clone());
                op.values.push(value.clone());
                op.flags = [(nx, SET_NX), (xx, SET_XX), (get, SET_GET)]
                    .iter()
                    .filter(|(on, _)| **on)
                    .fold(0, |flags, (_, bit)| flags | bit);
                write_op::Kind::SET
            }
            RedisWrite::MSet(p) => {
                pairs(&mut op, p);
                write_op::Kind::MSET
            }
            RedisWrite::MSetNx(p) => {
                pairs(&mut op, p);
                write_op::Kind::MSETNX
            }
            RedisWrite::Del(keys) => {
                op.keys = keys.clone();
                write_op::Kind::DEL
            }
            RedisWrite::IncrBy { key, delta } => {
                op.keys.push(key.clone());
                op.delta = *delta;
                write_op::Kind::INCRBY
            }
            RedisWrite::Append { key, value } => {
                op.keys.push(key.clone());
                op.values.push(value.clone());
                write_op::Kind::APPEND
            }
            RedisWrite::GetDel { key } => {
                op.keys.push(key.clone());
                write_op::Kind::GETDEL
            }
        };
        op.kind = EnumOrUnknown::new(kind);
        op
    }

    /// The write a decoded op asks for; a malformed op (unknown kind, wrong
    /// number of keys or values) is an error, so every replica skips it alike.
    pub fn from_proto(op: &WriteOp) -> Result<RedisWrite, String> {
        let kind = op
            .kind
            .enum_value()
            .map_err(|n| format!("unknown Redis write kind {n}"))?;
        let one = |with_value: bool| -> Result<(Vec<u8>, Vec<u8>), String> {
            let values_wanted = usize::from(with_value);
            if op.keys.len() != 1 || op.values.len() != values_wanted {
                return Err(format!(
                    "{kind:?} with {} keys and {} values",
                    op.keys.len(),
                    op.values.len()
                ));
            }
            let value = op.values.first().cloned().unwrap_or_default();
            Ok((op.keys[0].clone(), value))
        };
        let pairs = || -> Result<Pairs, String> {
            if op.keys.is_empty() || op.keys.len() != op.values.len() {
                return Err(format!(
                    "{kind:?} with {} keys and {} values",
                    op.keys.len(),
                    op.values.len()
                ));
            }
            Ok(op
                .keys
                .iter()
                .cloned()
                .zip(op.values.iter().cloned())
                .collect())
        };
        Ok(match kind {
            write_op::Kind::SET => {
                if op.flags & !(SET_NX | SET_XX | SET_GET) != 0 {
                    return Err(format!("SET with unknown flags {:#x}", op.flags));
                }
                let (key, value) = one(true)?;
                RedisWrite::Set {
                    key,
                    value,
                    nx: op.flags & SET_NX != 0,
                    xx: op.flags & SET_XX != 0,
                    get: op.flags & SET_GET != 0,
                }
            }
            write_op::Kind::MSET => RedisWrite::MSet(pairs()?),
            write_op::Kind::MSETNX => RedisWrite::MSetNx(pairs()?),
            write_op::Kind::DEL => {
                if op.keys.is_empty() || !op.values.is_empty() {
                    return Err("DEL needs keys and no values".into());
                }
                RedisWrite::Del(op.keys.clone())
            }
            write_op::Kind::INCRBY => RedisWrite::IncrBy {
                key: one(false)?.0,
                delta: op.delta,
            },
            write_op::Kind::APPEND => {
                let (key, value) = one(true)?;
                RedisWrite::Append { key, value }
            }
            write_op::Kind::GETDEL => RedisWrite::GetDel { key: one(false)?.0 },
        })
    }

    /// Every key the op names (for the size checks of the service).
    pub fn keys(&self) -> Vec<&[u8]> {
        match self {
            RedisWrite::Set { key, .. }
            | RedisWrite::IncrBy { key, .. }
            | RedisWrite::Append { key, .. }
            | RedisWrite::GetDel { key } => vec![key],
            RedisWrite::MSet(pairs) | RedisWrite::MSetNx(pairs) => {
                pairs.iter().map(|(k, _)| k.as_slice()).collect()
            }
            RedisWrite::Del(keys) => keys.iter().map(Vec::as_slice).collect(),
        }
    }

    /// Every value the op carries.
    pub fn values(&self) -> Vec<&[u8]> {
        match self {
            RedisWrite::Set { value, .. } | RedisWrite::Append { value, .. } => vec![value],
            RedisWrite::MSet(pairs) | RedisWrite::MSetNx(pairs) => {
                pairs.iter().map(|(_, v)| v.as_slice()).collect()
            }
            _ => Vec::new(),
        }
    }
}

impl RedisReply {
    pub fn to_proto(&self) -> OpReply {
        let mut reply = OpReply::default();
        let kind = match self {
            RedisReply::Ok => op_reply::Kind::OK,
            RedisReply::Nil => op_reply::Kind::NIL,
            RedisReply::Int(n) => {
                reply.int = *n;
                op_reply::Kind::INT
            }
            RedisReply::Bulk(bytes) => {
                reply.bulk = bytes.clone();
                op_reply::Kind::BULK
            }
            RedisReply::Error(text) => {
                reply.error = text.clone();
                op_reply::Kind::ERROR
            }
            RedisReply::Array(items) => {
                reply.items = items.iter().map(RedisReply::to_proto).collect();
                op_reply::Kind::ARRAY
            }
            RedisReply::Status(text) => {
                reply.bulk = text.as_bytes().to_vec();
                op_reply::Kind::STATUS
            }
            RedisReply::Map(pairs) => {
                reply.items = pairs
                    .iter()
                    .flat_map(|(key, value)| [key.to_proto(), value.to_proto()])
                    .collect();
                op_reply::Kind::ARRAY
            }
        };
        reply.kind = EnumOrUnknown::new(kind);
        reply
    }

    pub fn from_proto(reply: &OpReply) -> RedisReply {
        match reply.kind.enum_value() {
            Ok(op_reply::Kind::OK) => RedisReply::Ok,
            Ok(op_reply::Kind::NIL) => RedisReply::Nil,
            Ok(op_reply::Kind::INT) => RedisReply::Int(reply.int),
            Ok(op_reply::Kind::BULK) => RedisReply::Bulk(reply.bulk.clone()),
            Ok(op_reply::Kind::ERROR) => RedisReply::Error(reply.error.clone()),
            Ok(op_reply::Kind::ARRAY) => {
                RedisReply::Array(reply.items.iter().map(RedisReply::from_proto).collect())
            }
            Ok(op_reply::Kind::STATUS) => {
                RedisReply::Status(String::from_utf8_lossy(&reply.bulk).into_owned())
            }
            Err(n) => RedisReply::Error(format!("ERR unknown reply kind {n} from the server")),
        }
    }

    /// The copy a client session keeps: an old value longer than
    /// `max_bulk_bytes` (from SET GET or GETDEL) is replaced by an error
    /// saying it was not retained, so that saved replies stay small.
    pub fn to_saved(&self, max_bulk_bytes: usize) -> RedisReply {
        match self {
            RedisReply::Bulk(bytes) if bytes.len() > max_bulk_bytes => RedisReply::Error(
                "ERR this is a retry of an applied command, and its old value is not retained"
                    .into(),
            ),
            other => other.clone(),
        }
    }
}

/// Encodes replies as `ExecReply` bytes (how a session keeps them).
pub fn encode_replies(replies: &[RedisReply]) -> Vec<u8> {
    ExecReply {
        replies: replies.iter().map(RedisReply::to_proto).collect(),
        ..Default::default()
    }
    .write_to_bytes()
    .expect("an ExecReply always encodes")
}

pub fn decode_replies(bytes: &[u8]) -> Result<Vec<RedisReply>, String> {
    let reply = ExecReply::parse_from_bytes(bytes).map_err(|e| e.to_string())?;
    Ok(reply.replies.iter().map(RedisReply::from_proto).collect())
}

/// The keyspace as the writes see it: the state machine's map, with the
/// writes of the batch so far.
pub trait Keyspace {
    fn read(&mut self, key: &[u8]) -> Option<Vec<u8>>;
    fn write(&mut self, key: Vec<u8>, value: Vec<u8>);
    /// Removes `key`; true when it existed.
    fn delete(&mut self, key: &[u8]) -> bool;
}

/// Redis's error for a value over the size limit.
fn too_large(limit: usize) -> RedisReply {
    RedisReply::Error(format!(
        "ERR string exceeds maximum allowed size ({limit} bytes, max_value_bytes)"
    ))
}

/// Applies `ops` in order and answers each. An op that fails (a counter on a
/// non-integer, a value over `max_value_bytes`) changes nothing and answers
/// its error; the others still apply, as in a Redis pipeline.
pub fn apply_writes(
    space: &mut dyn Keyspace,
    ops: &[RedisWrite],
    max_value_bytes: usize,
) -> Vec<RedisReply> {
    ops.iter()
        .map(|op| apply_write(space, op, max_value_bytes))
        .collect()
}

fn apply_write(space: &mut dyn Keyspace, op: &RedisWrite, max_value_bytes: usize) -> RedisReply {
    if op.values().iter().any(|v| v.len() > max_value_bytes) {
        return too_large(max_value_bytes);
    }
    match op {
        RedisWrite::Set {
            key,
            value,
            nx,
            xx,
            get,
        } => {
            let old = space.read(key);
            let allowed = !(*nx && old.is_some() || *xx && old.is_none());
            if allowed {
                space.write(key.clone(), value.clone());
            }
            match (get, allowed) {
                (true, _) => old.map_or(RedisReply::Nil, RedisReply::Bulk),
                (false, true) => RedisReply::Ok,
                (false, false) => RedisReply::Nil,
            }
        }
        RedisWrite::MSet(pairs) => {
            for (key, value) in pairs {
                space.write(key.clone(), value.clone());
            }
            RedisReply::Ok
        }
        RedisWrite::MSetNx(pairs) => {
            if pairs.iter().any(|(key, _)| space.read(key).is_some()) {
                return RedisReply::Int(0);
            }
            for (key, value) in pairs {
                space.write(key.clone(), value.clone());
            }
            RedisReply::Int(1)
        }
        RedisWrite::Del(keys) => {
            let removed = keys.iter().filter(|key| space.delete(key)).count();
            RedisReply::Int(removed as i64)
        }
        RedisWrite::IncrBy { key, delta } => {
            let current = match space.read(key) {
                None => 0,
                Some(bytes) => match parse_i64(&bytes) {
                    Some(n) => n,
                    None => return RedisReply::Error(NOT_AN_INTEGER.into()),
                },
            };
            let Some(next) = current.checked_add(*delta) else {
                return RedisReply::Error(OVERFLOW.into());
            };
            space.write(key.clone(), next.to_string().into_bytes());
            RedisReply::Int(next)
        }
        RedisWrite::Append { key, value } => {
            let mut combined = space.read(key).unwrap_or_default();
            if combined.len().saturating_add(value.len()) > max_value_bytes {
                return too_large(max_value_bytes);
            }
            combined.extend_from_slice(value);
            let len = combined.len() as i64;
            space.write(key.clone(), combined);
            RedisReply::Int(len)
        }
        RedisWrite::GetDel { key } => match space.read(key) {
            Some(old) => {
                space.delete(key);
                RedisReply::Bulk(old)
            }
            None => RedisReply::Nil,
        },
    }
}

/// Parses a 64-bit integer the way Redis does (`string2ll`): an optional
/// '-', decimal digits, no leading zeros (except "0"), no spaces, no '+'.
pub fn parse_i64(bytes: &[u8]) -> Option<i64> {
    if bytes.is_empty() || bytes.len() > 20 {
        return None;
    }
    let digits = bytes.strip_prefix(b"-").unwrap_or(bytes);
    let canonical = !digits.is_empty()
        && digits.iter().all(u8::is_ascii_digit)
        && (digits == b"0" || digits[0] != b'0')
        && bytes != b"-0";
    if !canonical {
        return None;
    }
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

// ------------------------------------------------------------------ reads

fn engine_error(e: EngineError) -> String {
    e.to_string()
}

/// Answers `ops` from `view`. An engine failure is an error for the whole
/// batch (the server must not answer from a view it cannot trust).
pub fn execute_reads(view: &EngineView, ops: &[ReadOp]) -> Result<Vec<RedisReply>, String> {
    ops.iter().map(|op| execute_read(view, op)).collect()
}

/// Looks one key up: its value, `None` when absent, or why the store failed.
pub type PointGet<'a> = dyn FnMut(&[u8]) -> Result<Option<Vec<u8>>, String> + 'a;

/// A batch of point reads of at most this many keys may be answered on the apply thread
/// ([`execute_point_reads`]); a larger one reads a view on the requesting thread.
pub const MAX_POINT_READ_KEYS: usize = 1024;

/// True when `ops` are all point reads (each key looked up once, no range) of at most
/// [`MAX_POINT_READ_KEYS`] keys in all: their cost is bounded by the request, not the data.
pub fn are_point_reads(ops: &[ReadOp]) -> bool {
    let point = ops.iter().all(|op| {
        matches!(
            op.kind.enum_value(),
            Ok(read_op::Kind::GET
                | read_op::Kind::MGET
                | read_op::Kind::EXISTS
                | read_op::Kind::STRLEN
                | read_op::Kind::TYPE)
        )
    });
    point && ops.iter().map(|op| op.keys.len()).sum::<usize>() <= MAX_POINT_READ_KEYS
}

/// Answers point reads (see [`are_point_reads`]) through `get`: the applied state with its
/// uncommitted overlay, on the apply thread.
pub fn execute_point_reads(
    get: &mut PointGet<'_>,
    ops: &[ReadOp],
) -> Result<Vec<RedisReply>, String> {
    ops.iter()
        .map(|op| match point_read(get, op)? {
            Some(reply) => Ok(reply),
            None => Ok(RedisReply::Error(
                "ERR a range read among point reads".into(),
            )),
        })
        .collect()
}

/// The reply to `op` when it is a point read (or an unknown kind); `None` for a range read.
fn point_read(get: &mut PointGet<'_>, op: &ReadOp) -> Result<Option<RedisReply>, String> {
    let kind = match op.kind.enum_value() {
        Ok(kind) => kind,
        Err(n) => {
            return Ok(Some(RedisReply::Error(format!(
                "ERR unknown read kind {n}"
            ))))
        }
    };
    let first = op.keys.first().map(Vec::as_slice).unwrap_or_default();
    Ok(Some(match kind {
        read_op::Kind::GET => get(first)?.map_or(RedisReply::Nil, RedisReply::Bulk),
        read_op::Kind::MGET => RedisReply::Array(
            op.keys
                .iter()
                .map(|key| Ok(get(key)?.map_or(RedisReply::Nil, RedisReply::Bulk)))
                .collect::<Result<_, String>>()?,
        ),
        read_op::Kind::EXISTS => {
            let mut count = 0;
            for key in &op.keys {
                count += i64::from(get(key)?.is_some());
            }
            RedisReply::Int(count)
        }
        read_op::Kind::STRLEN => RedisReply::Int(get(first)?.map_or(0, |v| v.len() as i64)),
        read_op::Kind::TYPE => RedisReply::Status(
            if get(first)?.is_some() {
                "string"
            } else {
                "none"
            }
            .into(),
        ),
        read_op::Kind::SCAN | read_op::Kind::KEYS | read_op::Kind::DBSIZE => return Ok(None),
    }))
}

fn execute_read(view: &EngineView, op: &ReadOp) -> Result<RedisReply, String> {
    let mut get = |key: &[u8]| view.get(key).map_err(engine_error);
    if let Some(reply) = point_read(&mut get, op)? {
        return Ok(reply);
    }
    let Ok(kind) = op.kind.enum_value() else {
        unreachable!("point_read answers an unknown kind")
    };
    Ok(match kind {
        read_op::Kind::GET
        | read_op::Kind::MGET
        | read_op::Kind::EXISTS
        | read_op::Kind::STRLEN
        | read_op::Kind::TYPE => unreachable!("point_read answers the point reads"),
        read_op::Kind::SCAN => {
            let count = (op.count as usize).clamp(1, MAX_SCAN_COUNT);
            let after = op.has_after.then_some(op.after.as_slice());
            let mut keys = Vec::new();
            let mut last: Option<Vec<u8>> = None;
            let visited = view
                .scan(after, count, |key, _| {
                    if glob_match(&op.pattern, key) {
                        keys.push(RedisReply::Bulk(key.to_vec()));
                    }
                    last = Some(key.to_vec());
                })
                .map_err(engine_error)?;
            // Fewer keys than asked for: the scan reached the end.
            let next = match last {
                Some(last) if visited == count => RedisReply::Bulk(last),
                _ => RedisReply::Nil,
            };
            RedisReply::Array(vec![next, RedisReply::Array(keys)])
        }
        read_op::Kind::KEYS => {
            let mut keys = Vec::new();
            let mut over = false;
            walk(view, |key| {
                if glob_match(&op.pattern, key) {
                    if keys.len() == MAX_KEYS_REPLY {
                        over = true;
                        return false;
                    }
                    keys.push(RedisReply::Bulk(key.to_vec()));
                }
                true
            })?;
            if over {
                RedisReply::Error(format!(
                    "ERR KEYS would answer more than {MAX_KEYS_REPLY} keys; use SCAN"
                ))
            } else {
                RedisReply::Array(keys)
            }
        }
        read_op::Kind::DBSIZE => {
            let mut count = 0;
            walk(view, |_| {
                count += 1;
                true
            })?;
            RedisReply::Int(count)
        }
    })
}

/// Visits the keys of `view` in order, in bounded steps, while `each` says so.
fn walk(view: &EngineView, mut each: impl FnMut(&[u8]) -> bool) -> Result<(), String> {
    const STEP_KEYS: usize = 4096;
    let mut after: Option<Vec<u8>> = None;
    loop {
        let mut go_on = true;
        let mut step_last = None;
        let visited = view
            .scan(after.as_deref(), STEP_KEYS, |key, _| {
                if go_on {
                    go_on = each(key);
                    step_last = Some(key.to_vec());
                }
            })
            .map_err(engine_error)?;
        if !go_on || visited < STEP_KEYS {
            return Ok(());
        }
        after = step_last;
    }
}

/// Redis's glob (`stringmatchlen`): `*`, `?`, `[abc]`, `[^a]`, `[a-z]` and
/// `\x` escapes. An empty pattern matches everything (no MATCH given).
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    if pattern.is_empty() {
        return true;
    }
    // Iterative with one backtrack point for the last '*': linear in
    // practice, and never recursive (a hostile pattern cannot blow the stack).
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    star = Some((p, t));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    t += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = class_match(pattern, p, text[t]) {
                        if matched {
                            p = next;
                            t += 1;
                            continue;
                        }
                    }
                }
                b'\\' if p + 1 < pattern.len() && pattern[p + 1] == text[t] => {
                    p += 2;
                    t += 1;
                    continue;
                }
                b'\\' if p + 1 < pattern.len() => {}
                c if c == text[t] => {
                    p += 1;
                    t += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                p = sp + 1;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Whether `c` is in the class starting at `pattern[start] == '['`, and the
/// index after the class. `None` for an unterminated class (then '[' is a
/// literal that matched nothing).
fn class_match(pattern: &[u8], start: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut matched = false;
    while i < pattern.len() && pattern[i] != b']' {
        if pattern[i] == b'\\' && i + 1 < pattern.len() {
            matched |= pattern[i + 1] == c;
            i += 2;
        } else if i + 2 < pattern.len() && pattern[i + 1] == b'-' && pattern[i + 2] != b']' {
            let (low, high) = (
                pattern[i].min(pattern[i + 2]),
                pattern[i].max(pattern[i + 2]),
            );
            matched |= (low..=high).contains(&c);
            i += 3;
        } else {
            matched |= pattern[i] == c;
            i += 1;
        }
    }
    if i >= pattern.len() {
        return None;
    }
    Some((matched != negate, i + 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    impl Keyspace for BTreeMap<Vec<u8>, Vec<u8>> {
        fn read(&mut self, key: &[u8]) -> Option<Vec<u8>> {
            self.get(key).cloned()
        }
        fn write(&mut self, key: Vec<u8>, value: Vec<u8>) {
            self.insert(key, value);
        }
        fn delete(&mut self, key: &[u8]) -> bool {
            self.remove(key).is_some()
        }
    }

    fn k(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    #[test]
    fn integers_parse_like_redis() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"-12"), Some(-12));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"+1",
            b" 1",
            b"01",
            b"-0",
            b"1.5",
            b"9223372036854775808",
            b"abc",
        ] {
            assert_eq!(parse_i64(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn counters_refuse_non_integers_and_overflow_without_changing_anything() {
        let mut map = BTreeMap::new();
        map.insert(k("s"), k("abc"));
        map.insert(k("max"), i64::MAX.to_string().into_bytes());
        let replies = apply_writes(
            &mut map,
            &[
                RedisWrite::IncrBy {
                    key: k("n"),
                    delta: 5,
                },
                RedisWrite::IncrBy {
                    key: k("n"),
                    delta: -7,
                },
                RedisWrite::IncrBy {
                    key: k("s"),
                    delta: 1,
                },
                RedisWrite::IncrBy {
                    key: k("max"),
                    delta: 1,
                },
            ],
            1024,
        );
        assert_eq!(
            replies,
            vec![
                RedisReply::Int(5),
                RedisReply::Int(-2),
                RedisReply::Error(NOT_AN_INTEGER.into()),
                RedisReply::Error(OVERFLOW.into()),
            ]
        );
        assert_eq!(map[&k("s")], k("abc"));
        assert_eq!(map[&k("max")], i64::MAX.to_string().into_bytes());
    }

    #[test]
    fn msetnx_is_all_or_nothing_and_set_flags_follow_redis() {
        let mut map = BTreeMap::new();
        map.insert(k("b"), k("old"));
        let pairs = vec![(k("a"), k("1")), (k("b"), k("2"))];
        let replies = apply_writes(
            &mut map,
            &[
                RedisWrite::MSetNx(pairs.clone()),
                RedisWrite::Set {
                    key: k("c"),
                    value: k("x"),
                    nx: false,
                    xx: true,
                    get: false,
                },
                RedisWrite::Set {
                    key: k("b"),
                    value: k("new"),
                    nx: true,
                    xx: false,
                    get: false,
                },
                RedisWrite::Set {
                    key: k("b"),
                    value: k("new"),
                    nx: false,
                    xx: false,
                    get: true,
                },
                RedisWrite::Del(vec![k("b"), k("b"), k("zz")]),
                RedisWrite::MSetNx(pairs),
                RedisWrite::Append {
                    key: k("a"),
                    value: k("23"),
                },
                RedisWrite::GetDel { key: k("a") },
            ],
            1024,
        );
        assert_eq!(
            replies,
            vec![
                RedisReply::Int(0),
                RedisReply::Nil,
                RedisReply::Nil,
                RedisReply::Bulk(k("old")),
                RedisReply::Int(1),
                RedisReply::Int(1),
                RedisReply::Int(3),
                RedisReply::Bulk(k("123")),
            ]
        );
        assert_eq!(map.into_iter().collect::<Vec<_>>(), vec![(k("b"), k("2"))]);
    }

    #[test]
    fn writes_survive_the_wire_encoding() {
        let ops = vec![
            RedisWrite::Set {
                key: k("a"),
                value: k("1"),
                nx: true,
                xx: false,
                get: true,
            },
            RedisWrite::MSet(vec![(k("a"), k("1")), (k("b"), k(""))]),
            RedisWrite::MSetNx(vec![(k("a"), k("1"))]),
            RedisWrite::Del(vec![k("a"), k("b")]),
            RedisWrite::IncrBy {
                key: k("n"),
                delta: i64::MIN,
            },
            RedisWrite::Append {
                key: k("a"),
                value: k("x"),
            },
            RedisWrite::GetDel { key: k("a") },
        ];
        for op in ops {
            assert_eq!(RedisWrite::from_proto(&op.to_proto()), Ok(op));
        }
        let mut bad = RedisWrite::Del(vec![k("a")]).to_proto();
        bad.keys.clear();
        assert!(RedisWrite::from_proto(&bad).is_err());
        let replies = vec![
            RedisReply::Ok,
            RedisReply::Nil,
            RedisReply::Int(-3),
            RedisReply::Bulk(k("v")),
            RedisReply::Error("ERR x".into()),
            RedisReply::Status("string".into()),
            RedisReply::Array(vec![RedisReply::Nil, RedisReply::Array(vec![])]),
        ];
        assert_eq!(decode_replies(&encode_replies(&replies)), Ok(replies));
    }

    #[test]
    fn glob_matches_like_redis() {
        let cases: &[(&str, &str, bool)] = &[
            ("*", "anything", true),
            ("h?llo", "hello", true),
            ("h?llo", "hllo", false),
            ("h*llo", "heeeello", true),
            ("h[ae]llo", "hallo", true),
            ("h[ae]llo", "hillo", false),
            ("h[^e]llo", "hallo", true),
            ("h[^e]llo", "hello", false),
            ("h[a-b]llo", "hbllo", true),
            ("key:*:x", "key:12:x", true),
            ("key:*:x", "key:12:y", false),
            ("a\\*", "a*", true),
            ("a\\*", "ab", false),
            ("*a*b*c*", "xxaxxbxxcxx", true),
            ("[", "[", false),
        ];
        for (pattern, text, want) in cases {
            assert_eq!(
                glob_match(pattern.as_bytes(), text.as_bytes()),
                *want,
                "{pattern} ~ {text}"
            );
        }
    }
}
