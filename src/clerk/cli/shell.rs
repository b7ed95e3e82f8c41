//! The clerk's single operations and its shell: one operation run through a
//! `Clerk` and printed as the CLI prints it, or a loop reading operations
//! line by line (plain words, or JSON lines for scripts and tests) through
//! one clerk, so one client session. Every line read is bounded.

use std::io::{self, BufRead, Read, Write};

use serde_json::Value;

use super::args::{parse_json_op, parse_op, split_words, Exit, Op, USAGE};
use super::status_table::{status_line, STATUS_HEADER};
use crate::clerk::{json_object as object, CasResult, Clerk, ClerkError};

/// The longest line the shell reads; longer lines are answered as bad
/// requests and skipped.
const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// What an operation answered.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Answer {
    Done,
    Value(Option<Vec<u8>>),
    Deleted { existed: bool },
    Cas(CasResult),
}

fn execute(clerk: &mut Clerk, op: &Op) -> Result<Answer, ClerkError> {
    match op {
        Op::Get { key } => clerk.get(key).map(Answer::Value),
        Op::Put { key, value } => clerk.put(key, value).map(|()| Answer::Done),
        Op::Append { key, value } => clerk.append(key, value).map(|()| Answer::Done),
        Op::Delete { key } => clerk.delete(key).map(|existed| Answer::Deleted { existed }),
        Op::Cas {
            key,
            expected,
            value,
        } => clerk.cas(key, expected, value).map(Answer::Cas),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The JSON line answering one shell request.
fn json_answer(result: &Result<Answer, ClerkError>) -> String {
    let ok = ("ok", Value::Bool(true));
    let text_or_null = |value: &Option<Vec<u8>>| value.as_deref().map(text).into();
    match result {
        Ok(Answer::Done) => object(&[ok]),
        Ok(Answer::Value(value)) => object(&[ok, ("value", text_or_null(value))]),
        Ok(Answer::Deleted { existed }) => object(&[ok, ("existed", (*existed).into())]),
        Ok(Answer::Cas(cas)) => match &cas.current_unknown {
            None => object(&[
                ok,
                ("swapped", cas.swapped.into()),
                ("value", text_or_null(&cas.current)),
            ]),
            Some(why) => object(&[
                ok,
                ("swapped", cas.swapped.into()),
                ("found", cas.found.into()),
                ("value_unknown", why.as_str().into()),
            ]),
        },
        Err(error) => {
            let kind = match error {
                ClerkError::Timeout { .. } => "timeout",
                ClerkError::Rejected(_) => "rejected",
                ClerkError::Unknown { .. } => "unknown",
            };
            failure(kind, &error.to_string())
        }
    }
}

fn failure(kind: &str, message: &str) -> String {
    object(&[
        ("ok", Value::Bool(false)),
        ("error", kind.into()),
        ("message", message.into()),
    ])
}

/// The line the plain shell prints for one answer.
fn shell_answer(result: &Result<Answer, ClerkError>) -> String {
    match result {
        Ok(Answer::Done) => "OK".to_string(),
        Ok(Answer::Value(Some(value))) => text(value),
        Ok(Answer::Value(None)) | Ok(Answer::Deleted { existed: false }) => {
            "(not found)".to_string()
        }
        Ok(Answer::Deleted { existed: true }) => "deleted".to_string(),
        Ok(Answer::Cas(cas)) if cas.swapped => "swapped".to_string(),
        Ok(Answer::Cas(cas)) => match (&cas.current, &cas.current_unknown) {
            (_, Some(why)) => format!("not swapped (current value unknown: {why})"),
            (Some(current), None) => format!("not swapped (current value: {})", text(current)),
            (None, None) => "not swapped (the key is missing)".to_string(),
        },
        Err(error) => format!("error: {error}"),
    }
}

/// Runs one operation and reports it as the single-command CLI does.
pub(super) fn run_op(clerk: &mut Clerk, op: &Op) -> io::Result<Exit> {
    let mut out = io::stdout().lock();
    let exit = match execute(clerk, op) {
        Ok(Answer::Done) | Ok(Answer::Deleted { .. }) => Exit::Ok,
        Ok(Answer::Value(Some(value))) => {
            out.write_all(&value)?;
            out.write_all(b"\n")?;
            Exit::Ok
        }
        Ok(Answer::Value(None)) => {
            eprintln!("not found");
            Exit::NoMatch
        }
        Ok(Answer::Cas(cas)) if cas.swapped => Exit::Ok,
        Ok(Answer::Cas(cas)) => {
            out.write_all(cas.current.as_deref().unwrap_or_default())?;
            out.write_all(b"\n")?;
            eprintln!("not swapped");
            Exit::NoMatch
        }
        Err(error @ (ClerkError::Timeout { .. } | ClerkError::Unknown { .. })) => {
            eprintln!("clerk: {error}");
            Exit::Failed
        }
        Err(error @ ClerkError::Rejected(_)) => {
            eprintln!("clerk: {error}");
            Exit::Usage
        }
    };
    out.flush()?;
    Ok(exit)
}

/// Reads one line of at most `MAX_LINE_BYTES` into `buf` (newline removed).
/// `Ok(None)` at the end of input; `Ok(Some(false))` when the line was too
/// long and has been skipped.
fn read_line(input: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<Option<bool>> {
    buf.clear();
    let read = Read::take(&mut *input, MAX_LINE_BYTES as u64 + 1).read_until(b'\n', buf)?;
    if read == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        return Ok(Some(true));
    }
    if buf.len() <= MAX_LINE_BYTES {
        return Ok(Some(true)); // The last line, without a newline.
    }
    // Too long: drop the rest of the line in bounded pieces.
    loop {
        buf.clear();
        let read = Read::take(&mut *input, MAX_LINE_BYTES as u64).read_until(b'\n', buf)?;
        if read == 0 || buf.last() == Some(&b'\n') {
            buf.clear();
            return Ok(Some(false));
        }
    }
}

pub(super) fn run_shell(clerk: &mut Clerk, json: bool) -> io::Result<Exit> {
    // SAFETY: isatty only inspects the file descriptor.
    let interactive = !json && unsafe { libc::isatty(libc::STDIN_FILENO) } == 1;
    let stdin = io::stdin();
    let mut input = stdin.lock();
    let mut out = io::stdout().lock();
    let mut buf = Vec::new();
    loop {
        if interactive {
            out.write_all(b"kv> ")?;
            out.flush()?;
        }
        let Some(fits) = read_line(&mut input, &mut buf)? else {
            return Ok(Exit::Ok);
        };
        let line = match (fits, std::str::from_utf8(&buf)) {
            (false, _) => Err(format!("the line is longer than {MAX_LINE_BYTES} bytes")),
            (true, Ok(line)) => Ok(line.trim()),
            (true, Err(e)) => Err(format!("the line is not UTF-8: {e}")),
        };
        if line.as_ref().is_ok_and(|line| line.is_empty()) {
            continue;
        }
        let answer = if json {
            match line.and_then(parse_json_op) {
                Ok(op) => json_answer(&execute(clerk, &op)),
                Err(message) => failure("bad_request", &message),
            }
        } else {
            match line.and_then(split_words) {
                Ok(words) => match words.first().map(String::as_str) {
                    Some("quit" | "exit") => return Ok(Exit::Ok),
                    Some("help") => USAGE.to_string(),
                    Some("status") if words.len() == 1 => {
                        let views = clerk.status_all();
                        let lines: Vec<String> = views.iter().map(status_line).collect();
                        format!("{STATUS_HEADER}\n{}", lines.join("\n"))
                    }
                    _ => match parse_op(&words) {
                        Ok(op) => shell_answer(&execute(clerk, &op)),
                        Err(message) => format!("error: {message} (try help)"),
                    },
                },
                Err(message) => format!("error: {message}"),
            }
        };
        out.write_all(answer.as_bytes())?;
        out.write_all(b"\n")?;
        out.flush()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_answers() {
        let cas = |swapped, current: Option<&str>| {
            Ok(Answer::Cas(CasResult {
                swapped,
                found: current.is_some(),
                current: current.map(|c| c.as_bytes().to_vec()),
                current_unknown: None,
            }))
        };
        let cases = [
            (Ok(Answer::Done), r#"{"ok":true}"#),
            (
                Ok(Answer::Value(Some(b"v".to_vec()))),
                r#"{"ok":true,"value":"v"}"#,
            ),
            (Ok(Answer::Value(None)), r#"{"ok":true,"value":null}"#),
            (
                Ok(Answer::Deleted { existed: true }),
                r#"{"ok":true,"existed":true}"#,
            ),
            (
                cas(false, Some("cur")),
                r#"{"ok":true,"swapped":false,"value":"cur"}"#,
            ),
            (
                cas(true, None),
                r#"{"ok":true,"swapped":true,"value":null}"#,
            ),
        ];
        for (answer, expected) in cases {
            assert_eq!(json_answer(&answer), expected);
        }
        let timeout = json_answer(&Err(ClerkError::Timeout {
            last_error: "x".into(),
        }));
        assert!(
            timeout.starts_with(r#"{"ok":false,"error":"timeout","message":"#),
            "{timeout}"
        );
        let timeout: Value = serde_json::from_str(&timeout).unwrap();
        assert_eq!(timeout["ok"], false);
        assert_eq!(timeout["error"], "timeout");
        assert!(timeout["message"]
            .as_str()
            .unwrap()
            .contains("outcome is unknown"));
    }

    #[test]
    fn long_lines_are_skipped_whole() {
        let mut text = vec![b'x'; MAX_LINE_BYTES + 10];
        text.extend_from_slice(b"\nnext\r\nlast");
        let mut input = io::Cursor::new(text);
        let mut buf = Vec::new();
        assert_eq!(read_line(&mut input, &mut buf).unwrap(), Some(false));
        assert_eq!(read_line(&mut input, &mut buf).unwrap(), Some(true));
        assert_eq!(buf, b"next");
        assert_eq!(read_line(&mut input, &mut buf).unwrap(), Some(true));
        assert_eq!(buf, b"last");
        assert_eq!(read_line(&mut input, &mut buf).unwrap(), None);
    }
}
