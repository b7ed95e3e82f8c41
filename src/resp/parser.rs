//! The RESP2 request parser: multibulk commands (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`, what
//! every client library sends) and inline commands (`GET k\r\n`, what a person types into
//! `telnet` or `nc`). Incremental: [`parse`] looks at the bytes buffered so far and either
//! returns one complete command and how many bytes it took, or says that more bytes are
//! needed, or names what is wrong (Redis's own error texts; the connection is then closed).
//! Every size is bounded before anything is allocated for it: a bulk length or argument
//! count from the network never sizes an allocation by itself.

/// The bounds of one request.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The longest argument (bulk string).
    pub max_bulk_bytes: usize,
    /// The most arguments of one command.
    pub max_args: usize,
    /// The longest inline command line, and the longest `*`/`$` header line.
    pub max_inline_bytes: usize,
}

/// What [`parse`] found at the start of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A command (its arguments; never empty) that took this many bytes.
    Command(Vec<Vec<u8>>, usize),
    /// An empty inline line, or `*0`/`*-1`: nothing to run; skip the bytes.
    Nothing(usize),
    /// The buffer holds only part of a command.
    Incomplete,
    /// A protocol error: the reply's text (without the leading '-').
    Error(String),
}

fn protocol_error(what: &str) -> Parsed {
    Parsed::Error(format!("ERR Protocol error: {what}"))
}

/// Parses the first request of `buf`.
pub fn parse(buf: &[u8], limits: &Limits) -> Parsed {
    match buf.first() {
        None => Parsed::Incomplete,
        Some(b'*') => parse_multibulk(buf, limits),
        Some(_) => parse_inline(buf, limits),
    }
}

/// The line starting at `start` (without its "\r\n") and the index after it; `Err` when
/// the line is longer than `max` (`Ok(None)`: not all here yet).
fn line(buf: &[u8], start: usize, max: usize) -> Result<Option<(&[u8], usize)>, ()> {
    let window = &buf[start..buf.len().min(start + max + 2)];
    match window.iter().position(|&b| b == b'\n') {
        Some(at) => {
            let line = &window[..at];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            Ok(Some((line, start + at + 1)))
        }
        None if window.len() >= max + 2 => Err(()),
        None => Ok(None),
    }
}

/// A length in a `*` or `$` header: decimal digits with an optional '-'.
fn header_number(digits: &[u8]) -> Option<i64> {
    super::super::kv::redis_ops::parse_i64(digits)
}

fn parse_multibulk(buf: &[u8], limits: &Limits) -> Parsed {
    let (count_line, mut pos) = match line(buf, 1, limits.max_inline_bytes) {
        Ok(Some(found)) => found,
        Ok(None) => return Parsed::Incomplete,
        Err(()) => return protocol_error("too big mbulk count string"),
    };
    let count = match header_number(count_line) {
        Some(n) if n <= 0 => return Parsed::Nothing(pos),
        Some(n) if n as u64 <= limits.max_args as u64 => n as usize,
        _ => return protocol_error("invalid multibulk length"),
    };
    // Grows with the arguments that actually arrive, never to `count` up front.
    let mut args = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        if pos >= buf.len() {
            return Parsed::Incomplete;
        }
        if buf[pos] != b'$' {
            let got = char::from(buf[pos]).escape_default().to_string();
            return protocol_error(&format!("expected '$', got '{got}'"));
        }
        let (len_line, after) = match line(buf, pos + 1, limits.max_inline_bytes) {
            Ok(Some(found)) => found,
            Ok(None) => return Parsed::Incomplete,
            Err(()) => return protocol_error("too big bulk count string"),
        };
        let len = match header_number(len_line) {
            Some(n) if n >= 0 && n as u64 <= limits.max_bulk_bytes as u64 => n as usize,
            _ => return protocol_error("invalid bulk length"),
        };
        let end = after + len;
        if buf.len() < end + 2 {
            return Parsed::Incomplete;
        }
        if &buf[end..end + 2] != b"\r\n" {
            return protocol_error("the bulk string does not end with CRLF");
        }
        args.push(buf[after..end].to_vec());
        pos = end + 2;
    }
    Parsed::Command(args, pos)
}

fn parse_inline(buf: &[u8], limits: &Limits) -> Parsed {
    let (text, end) = match line(buf, 0, limits.max_inline_bytes) {
        Ok(Some(found)) => found,
        Ok(None) => return Parsed::Incomplete,
        Err(()) => return protocol_error("too big inline request"),
    };
    match split_inline(text) {
        Some(args) if args.is_empty() => Parsed::Nothing(end),
        Some(args) if args.len() > limits.max_args => protocol_error("invalid multibulk length"),
        Some(args) => Parsed::Command(args, end),
        None => protocol_error("unbalanced quotes in request"),
    }
}

/// Splits an inline line into arguments as redis-server does (`sdssplitargs`): spaces
/// separate, "double quotes" take `\n \r \t \\ \" \xHH` escapes, 'single quotes' take
/// `\'`. `None` for unbalanced quotes or a quote not followed by a space.
pub fn split_inline(text: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while i < text.len() && text[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == text.len() {
            return Some(args);
        }
        let mut arg = Vec::new();
        match text[i] {
            quote @ (b'"' | b'\'') => {
                i += 1;
                loop {
                    let c = *text.get(i)?;
                    i += 1;
                    if c == quote {
                        break;
                    }
                    if c != b'\\' || i == text.len() {
                        arg.push(c);
                        continue;
                    }
                    let escaped = text[i];
                    i += 1;
                    let byte = match (quote, escaped) {
                        (b'"', b'n') => b'\n',
                        (b'"', b'r') => b'\r',
                        (b'"', b't') => b'\t',
                        (b'"', b'x') if i + 1 < text.len() => {
                            let hex = std::str::from_utf8(&text[i..i + 2]).ok();
                            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                                Some(byte) => {
                                    i += 2;
                                    byte
                                }
                                None => b'x',
                            }
                        }
                        (b'\'', b'\'') | (b'"', _) => escaped,
                        _ => {
                            // In single quotes only \' is an escape.
                            arg.push(b'\\');
                            escaped
                        }
                    };
                    arg.push(byte);
                }
                if i < text.len() && !text[i].is_ascii_whitespace() {
                    return None;
                }
            }
            _ => {
                while i < text.len() && !text[i].is_ascii_whitespace() {
                    arg.push(text[i]);
                    i += 1;
                }
            }
        }
        args.push(arg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_bulk_bytes: 16,
        max_args: 4,
        max_inline_bytes: 32,
    };

    fn args(list: &[&str]) -> Vec<Vec<u8>> {
        list.iter().map(|a| a.as_bytes().to_vec()).collect()
    }

    #[test]
    fn multibulk_and_inline_commands_parse_whole_or_not_at_all() {
        let request = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
        assert_eq!(
            parse(request, &LIMITS),
            Parsed::Command(args(&["GET", "k"]), request.len())
        );
        for cut in 0..request.len() {
            assert_eq!(
                parse(&request[..cut], &LIMITS),
                Parsed::Incomplete,
                "cut {cut}"
            );
        }
        assert_eq!(
            parse(b"set a \"b c\\n\" 'd'\r\nPING", &LIMITS),
            Parsed::Command(args(&["set", "a", "b c\n", "d"]), 19)
        );
        assert_eq!(
            parse(b"PING\n", &LIMITS),
            Parsed::Command(args(&["PING"]), 5)
        );
        assert_eq!(parse(b"  \r\n", &LIMITS), Parsed::Nothing(4));
        assert_eq!(parse(b"*0\r\n", &LIMITS), Parsed::Nothing(4));
        assert_eq!(parse(b"*-1\r\n", &LIMITS), Parsed::Nothing(5));
    }

    #[test]
    fn oversized_and_malformed_requests_get_redis_errors() {
        let error = |text: &str| Parsed::Error(format!("ERR Protocol error: {text}"));
        assert_eq!(parse(b"*5\r\n", &LIMITS), error("invalid multibulk length"));
        assert_eq!(
            parse(b"*3000000000\r\n", &LIMITS),
            error("invalid multibulk length")
        );
        assert_eq!(parse(b"*x\r\n", &LIMITS), error("invalid multibulk length"));
        assert_eq!(
            parse(b"*1\r\n$17\r\n", &LIMITS),
            error("invalid bulk length")
        );
        assert_eq!(
            parse(b"*1\r\n$-1\r\n", &LIMITS),
            error("invalid bulk length")
        );
        assert_eq!(
            parse(b"*1\r\n+x\r\n", &LIMITS),
            error("expected '$', got '+'")
        );
        assert_eq!(
            parse(b"*1\r\n$1\r\nab\r\n", &LIMITS),
            error("the bulk string does not end with CRLF")
        );
        assert_eq!(parse(&[b'a'; 40], &LIMITS), error("too big inline request"));
        assert_eq!(
            parse(&[b'*', b'1', b'1', b'1'].repeat(20), &LIMITS),
            error("too big mbulk count string")
        );
        assert_eq!(
            parse(b"get \"a\r\n", &LIMITS),
            error("unbalanced quotes in request")
        );
        assert_eq!(
            parse(b"a b c d e\r\n", &LIMITS),
            error("invalid multibulk length")
        );
    }
}
