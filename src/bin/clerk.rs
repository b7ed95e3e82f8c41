//! `clerk`: the command-line client. One operation per run (`get`, `put`,
//! `append`, `delete`, `cas`), the cluster's `status`, or a `shell` that
//! reads operations line by line (plain words, or JSON lines with `--json`
//! for scripts and tests) through one clerk, so one client session.
//!
//! Exit codes: 0 success; 1 key not found or cas not swapped; 2 no answer
//! before the deadline (the outcome of a write is then unknown) or the
//! cluster unreachable; 3 bad usage, a bad config file or a rejected
//! request. Every failure prints one line on stderr naming what is wrong.

use std::io::{self, BufRead, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use kvstore_raft::check::KvInput;
use kvstore_raft::clerk::member::{self, MemberCommand};
use kvstore_raft::clerk::{
    json_object as object, CasResult, Clerk, ClerkError, ClerkOptions, NodeStatusView,
};
use kvstore_raft::config::ClusterConfig;
use kvstore_raft::kv::server::PROMOTE_MAX_LAG_ENTRIES;
use serde_json::Value;

const USAGE: &str = "\
usage: clerk [--config FILE] [--timeout SECS] [--token TOKEN] COMMAND [ARGS]

commands:
  get KEY                  print the value (exit 1 when the key is missing)
  put KEY VALUE            set the value
  append KEY VALUE         append to the value (a missing key counts as \"\")
  delete KEY               remove the key
  cas KEY EXPECTED NEW     set NEW if the value is EXPECTED (exit 1 and print
                           the current value when it is not)
  status [--json]          every node's role, term, leader, commit, applied, log
  shell [--json]           read commands (or JSON lines) from stdin, one per line
  snapshot save FILE [--node ID]
                           stream a consistent backup of the leader's (or node
                           ID's) state machine into FILE, with a checksum
  snapshot status FILE [--json]
                           check FILE and print what the backup holds
                           (no cluster needed)
  member list [--json]     the members: id, address, voter or learner, leader, lag
  member add ID IP:PORT [--learner]
                           add a node as a learner, wait until it has caught up,
                           promote it (unless --learner); exit 0 once committed
  member promote ID        make a learner a voter
  member remove ID         remove a member (the leader too: it hands over)
  transfer-leader ID       hand leadership to voter ID; returns once it leads

exit codes: 0 ok, 1 not found / not swapped, 2 no answer before the deadline
(the outcome is unknown) or cluster unreachable, 3 bad usage, config or request";

/// The longest `--timeout`: a day.
const MAX_TIMEOUT_SECS: f64 = 86_400.0;
/// The per-RPC limit, unless the whole deadline is shorter.
const ATTEMPT_TIMEOUT_MS: u64 = 1_000;
/// The longest line the shell reads; longer lines are answered as bad
/// requests and skipped.
const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exit {
    Ok = 0,
    NoMatch = 1,
    Failed = 2,
    Usage = 3,
}

/// One key-value operation, from the command line or a shell line.
/// One operation of the shell: the same shape as a history's input, so a
/// `shell --json` line is exactly the checker's JSON for that operation.
type Op = KvInput;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    Op(Op),
    Status { json: bool },
    Shell { json: bool },
    SnapshotSave { path: PathBuf, node: Option<u64> },
    SnapshotStatus { path: PathBuf, json: bool },
    Member(MemberCommand),
    Help,
}

#[derive(Clone, Debug, PartialEq)]
struct Cli {
    config: PathBuf,
    timeout: Duration,
    token: Option<String>,
    action: Action,
}

/// What an operation answered.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Answer {
    Done,
    Value(Option<Vec<u8>>),
    Deleted { existed: bool },
    Cas(CasResult),
}

fn parse_args(args: &[String]) -> Result<Cli, String> {
    let mut opts = getopts::Options::new();
    // Options end at the command, so values such as "-1" are data.
    opts.parsing_style(getopts::ParsingStyle::StopAtFirstFree);
    opts.optopt(
        "",
        "config",
        "the cluster file (default conf/cluster.json)",
        "FILE",
    );
    opts.optopt("", "timeout", "deadline per operation (default 10)", "SECS");
    opts.optopt("", "token", "the cluster's client token", "TOKEN");
    opts.optflag("h", "help", "print this help");
    let matches = opts.parse(args).map_err(|e| e.to_string())?;
    let timeout = match matches.opt_str("timeout") {
        None => Duration::from_secs(10),
        Some(text) => parse_timeout(&text)?,
    };
    let action = if matches.opt_present("help") {
        Action::Help
    } else {
        parse_command(&matches.free)?
    };
    Ok(Cli {
        config: PathBuf::from(
            matches
                .opt_str("config")
                .unwrap_or_else(|| "conf/cluster.json".to_string()),
        ),
        timeout,
        token: matches.opt_str("token"),
        action,
    })
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|secs| secs.is_finite() && *secs > 0.0 && *secs <= MAX_TIMEOUT_SECS)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| {
            format!("--timeout {text:?} is not a number of seconds above 0 and at most {MAX_TIMEOUT_SECS}")
        })
}

/// The command and its arguments (everything after the options).
fn parse_command(words: &[String]) -> Result<Action, String> {
    let Some(command) = words.first() else {
        return Err("no command given".to_string());
    };
    if let Some(parsed) = member::parse_command(words) {
        return parsed.map(Action::Member);
    }
    match command.as_str() {
        "status" | "shell" => {
            let json = match &words[1..] {
                [] => false,
                [flag] if flag == "--json" => true,
                [other, ..] => return Err(format!("{command}: unexpected argument {other:?}")),
            };
            Ok(if command == "status" {
                Action::Status { json }
            } else {
                Action::Shell { json }
            })
        }
        "help" => Ok(Action::Help),
        "snapshot" => parse_snapshot(&words[1..]),
        _ => parse_op(words).map(Action::Op),
    }
}

/// `snapshot save FILE [--node ID]` or `snapshot status FILE [--json]`.
fn parse_snapshot(words: &[String]) -> Result<Action, String> {
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["save", file] => Ok(Action::SnapshotSave {
            path: PathBuf::from(file),
            node: None,
        }),
        ["save", file, "--node", id] => {
            let id = id
                .parse::<u64>()
                .map_err(|_| format!("snapshot save: --node {id:?} is not a node id"))?;
            Ok(Action::SnapshotSave {
                path: PathBuf::from(file),
                node: Some(id),
            })
        }
        ["status", file] => Ok(Action::SnapshotStatus {
            path: PathBuf::from(file),
            json: false,
        }),
        ["status", file, "--json"] => Ok(Action::SnapshotStatus {
            path: PathBuf::from(file),
            json: true,
        }),
        _ => Err("usage: snapshot save FILE [--node ID] | snapshot status FILE [--json]".into()),
    }
}

/// `snapshot status`: checks the file and prints what it holds; exit 3 when it is damaged.
fn run_snapshot_status(path: &std::path::Path, json: bool) -> Exit {
    match kvstore_raft::kv::backup::inspect(path) {
        Ok(info) => {
            println!("{}", describe_backup(&info, json));
            Exit::Ok
        }
        Err(error) => {
            eprintln!("clerk: {error}");
            Exit::Usage
        }
    }
}

fn describe_backup(info: &kvstore_raft::kv::backup::BackupInfo, json: bool) -> String {
    if json {
        return serde_json::to_string(info).expect("a backup's description serializes");
    }
    let header = &info.header;
    format!(
        "{}: backup version {} of cluster {:?} from node {}, index {}, term {}, created at {}          ms since the epoch; {} keys, {} sessions, {} stream bytes in {} chunks; {} bytes,          checksum {:#010x} ok",
        info.path.display(),
        info.version,
        header.cluster_id,
        header.node_id,
        header.index,
        header.term,
        header.created_at_ms,
        info.trailer.keys,
        info.trailer.sessions,
        info.trailer.stream_bytes,
        info.trailer.chunks,
        info.file_bytes,
        info.checksum
    )
}

/// A key-value operation from words: `get KEY`, `put KEY VALUE`, ...
fn parse_op(words: &[String]) -> Result<Op, String> {
    let (name, args) = words.split_first().ok_or("empty command")?;
    let arity = match name.as_str() {
        "get" | "delete" => 1,
        "put" | "append" => 2,
        "cas" => 3,
        _ => return Err(format!("unknown command {name:?}")),
    };
    if args.len() != arity {
        let wanted = match arity {
            1 => "KEY",
            2 => "KEY VALUE",
            _ => "KEY EXPECTED NEW",
        };
        return Err(format!(
            "{name} takes {wanted} ({} argument{} given)",
            args.len(),
            if args.len() == 1 { "" } else { "s" }
        ));
    }
    let arg = |i: usize| args[i].clone();
    Ok(match name.as_str() {
        "get" => Op::Get { key: arg(0) },
        "delete" => Op::Delete { key: arg(0) },
        "put" => Op::Put {
            key: arg(0),
            value: arg(1),
        },
        "append" => Op::Append {
            key: arg(0),
            value: arg(1),
        },
        _ => Op::Cas {
            key: arg(0),
            expected: arg(1),
            value: arg(2),
        },
    })
}

/// Splits a shell line into words at whitespace. A word in double quotes
/// may hold spaces and be empty; inside quotes `\"` and `\\` escape.
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let Some(&first) = chars.peek() else {
            return Ok(words);
        };
        let mut word = String::new();
        if first == '"' {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("a quoted word is not closed".to_string()),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c @ ('"' | '\\')) => word.push(c),
                        _ => return Err("only \\\" and \\\\ may follow \\ in quotes".to_string()),
                    },
                    Some(c) => word.push(c),
                }
            }
            if chars.peek().is_some_and(|c| !c.is_whitespace()) {
                return Err("a quoted word must be followed by a space".to_string());
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                word.push(c);
            }
        }
        words.push(word);
    }
}

fn parse_json_op(line: &str) -> Result<Op, String> {
    serde_json::from_str(line).map_err(|e| e.to_string())
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

const STATUS_HEADER: &str = "ID  ADDRESS               ROLE           TERM    LEADER  COMMIT      APPLIED     LOG_BYTES     SNAPSHOT";

fn status_line(view: &NodeStatusView) -> String {
    let addr = view.addr_text();
    match &view.status {
        Ok(s) => format!(
            "{:<3} {:<21} {:<14} {:<7} {:<7} {:<11} {:<11} {:<13} {}",
            view.id,
            addr,
            s.role,
            s.term,
            s.leader,
            s.commit,
            s.applied,
            s.log_bytes,
            s.snapshot_index
        ),
        Err(error) => {
            let role = if view.rejected {
                "refused"
            } else {
                "unreachable"
            };
            format!("{:<3} {:<21} {:<14} {error}", view.id, addr, role)
        }
    }
}

fn run_status(clerk: &Clerk, json: bool) -> Exit {
    let views = clerk.status_all();
    if json {
        let objects: Vec<String> = views.iter().map(NodeStatusView::to_json).collect();
        println!("[{}]", objects.join(","));
    } else {
        println!("{STATUS_HEADER}");
        for view in &views {
            println!("{}", status_line(view));
        }
    }
    let refusal = views
        .iter()
        .find_map(|view| view.status.as_ref().err().filter(|_| view.rejected));
    if views.iter().any(|view| view.status.is_ok()) {
        Exit::Ok
    } else if let Some(error) = refusal {
        eprintln!("clerk: request rejected: {error}");
        Exit::Usage
    } else {
        eprintln!("clerk: no node answered: the cluster is unreachable");
        Exit::Failed
    }
}

/// Runs one operation and reports it as the single-command CLI does.
fn run_op(clerk: &mut Clerk, op: &Op) -> io::Result<Exit> {
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

fn run_shell(clerk: &mut Clerk, json: bool) -> io::Result<Exit> {
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

fn run(cli: Cli) -> Exit {
    if let Action::SnapshotStatus { path, json } = &cli.action {
        return run_snapshot_status(path, *json);
    }
    let config = match ClusterConfig::load(&cli.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("clerk: {error}");
            return Exit::Usage;
        }
    };
    let timeout_ms = u64::try_from(cli.timeout.as_millis()).unwrap_or(u64::MAX);
    let options = ClerkOptions {
        timeout: cli.timeout,
        attempt_timeout_ms: ATTEMPT_TIMEOUT_MS.min(timeout_ms).max(1),
        client_token: cli.token.or_else(|| config.client_token.clone()),
    };
    let mut clerk = Clerk::new(&config, options);
    let result = match &cli.action {
        Action::Help => unreachable!("help is answered before the config is read"),
        Action::Status { json } => Ok(run_status(&clerk, *json)),
        Action::Shell { json } => run_shell(&mut clerk, *json),
        Action::Op(op) => run_op(&mut clerk, op),
        Action::SnapshotStatus { .. } => unreachable!("answered before the config is read"),
        Action::SnapshotSave { path, node } => {
            match clerk.snapshot_save(*node, &config.cluster_id, path) {
                Ok(info) => {
                    println!("{}", describe_backup(&info, false));
                    Ok(Exit::Ok)
                }
                Err(error) => {
                    eprintln!("clerk: snapshot save {}: {error}", path.display());
                    Ok(match error {
                        ClerkError::Timeout { .. } => Exit::Failed,
                        _ => Exit::Usage,
                    })
                }
            }
        }
        Action::Member(command) => Ok(run_member(&mut clerk, command, cli.timeout)),
    };
    result.unwrap_or_else(|error| {
        eprintln!("clerk: cannot read stdin or write stdout: {error}");
        Exit::Failed
    })
}

fn run_member(clerk: &mut Clerk, command: &MemberCommand, timeout: Duration) -> Exit {
    match member::run_command(clerk, command, PROMOTE_MAX_LAG_ENTRIES, timeout) {
        Ok(output) => {
            println!("{output}");
            Exit::Ok
        }
        Err(error @ ClerkError::Rejected(_)) => {
            eprintln!("clerk: {error}");
            Exit::Usage
        }
        Err(error) => {
            eprintln!("clerk: {error}");
            Exit::Failed
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let exit = match parse_args(&args) {
        Ok(Cli {
            action: Action::Help,
            ..
        }) => {
            println!("{USAGE}");
            Exit::Ok
        }
        Ok(cli) => run(cli),
        Err(message) => {
            eprintln!("clerk: {message} (see clerk --help)");
            Exit::Usage
        }
    };
    ExitCode::from(exit as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_string).collect()
    }

    fn parse(line: &str) -> Result<Cli, String> {
        parse_args(&args(line))
    }

    fn op(line: &str) -> Op {
        match parse(line).unwrap().action {
            Action::Op(op) => op,
            other => panic!("{line}: not an op: {other:?}"),
        }
    }

    #[test]
    fn defaults_and_options() {
        let cli = parse("get k").unwrap();
        assert_eq!(cli.config, PathBuf::from("conf/cluster.json"));
        assert_eq!(cli.timeout, Duration::from_secs(10));
        assert_eq!(cli.token, None);
        let cli = parse("--config c.json --timeout 0.5 --token t status --json").unwrap();
        assert_eq!(cli.config, PathBuf::from("c.json"));
        assert_eq!(cli.timeout, Duration::from_millis(500));
        assert_eq!(cli.token.as_deref(), Some("t"));
        assert_eq!(cli.action, Action::Status { json: true });
        assert_eq!(
            parse("shell").unwrap().action,
            Action::Shell { json: false }
        );
        assert_eq!(parse("--help").unwrap().action, Action::Help);
    }

    #[test]
    fn operations() {
        assert_eq!(op("get k"), Op::Get { key: "k".into() });
        assert_eq!(op("delete k"), Op::Delete { key: "k".into() });
        assert_eq!(
            op("put k -1"),
            Op::Put {
                key: "k".into(),
                value: "-1".into()
            }
        );
        assert_eq!(
            op("append k --json"),
            Op::Append {
                key: "k".into(),
                value: "--json".into()
            }
        );
        assert_eq!(
            op("cas k a b"),
            Op::Cas {
                key: "k".into(),
                expected: "a".into(),
                value: "b".into()
            }
        );
    }

    #[test]
    fn bad_usage_says_what_is_wrong() {
        let cases = [
            ("", "no command given"),
            ("frob k", "unknown command \"frob\""),
            ("get", "get takes KEY (0 arguments given)"),
            ("put k", "put takes KEY VALUE (1 argument given)"),
            ("cas k a", "cas takes KEY EXPECTED NEW (2 arguments given)"),
            ("status --yaml", "status: unexpected argument \"--yaml\""),
            (
                "--timeout 0 get k",
                "--timeout \"0\" is not a number of seconds above 0 and at most 86400",
            ),
            (
                "--timeout x get k",
                "--timeout \"x\" is not a number of seconds above 0 and at most 86400",
            ),
            ("--bogus get k", "Unrecognized option: 'bogus'"),
            ("--config", "Argument to option 'config' missing"),
        ];
        for (line, expected) in cases {
            assert_eq!(parse(line).unwrap_err(), expected, "for {line:?}");
        }
    }

    #[test]
    fn shell_words() {
        assert_eq!(split_words("  put  k   v ").unwrap(), args("put k v"));
        assert_eq!(
            split_words(r#"cas k "" "a b\"c\\""#).unwrap(),
            vec!["cas", "k", "", "a b\"c\\"]
        );
        assert_eq!(split_words("").unwrap(), Vec::<String>::new());
        assert_eq!(
            split_words(r#"put "k"#).unwrap_err(),
            "a quoted word is not closed"
        );
        assert!(split_words(r#"put "k"v"#).is_err());
        assert!(split_words(r#"put "\n""#).is_err());
    }

    #[test]
    fn json_requests() {
        assert_eq!(
            parse_json_op(r#"{"op":"get","key":"k"}"#).unwrap(),
            Op::Get { key: "k".into() }
        );
        assert_eq!(
            parse_json_op(r#"{"key":"k","value":"v","op":"append"}"#).unwrap(),
            Op::Append {
                key: "k".into(),
                value: "v".into()
            }
        );
        assert_eq!(
            parse_json_op(r#"{"op":"cas","key":"k","expected":"a","value":"b"}"#).unwrap(),
            Op::Cas {
                key: "k".into(),
                expected: "a".into(),
                value: "b".into()
            }
        );
        for bad in [
            r#"{"op":"get"}"#,
            r#"{"op":"put","key":"k"}"#,
            r#"{"op":"get","key":"k","vlaue":"v"}"#,
            r#"{"op":"frob","key":"k"}"#,
            r#"{"key":"k"}"#,
            r#"{"op":"get","key":7}"#,
            "get k",
        ] {
            assert!(parse_json_op(bad).is_err(), "{bad} parsed");
        }
    }

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
