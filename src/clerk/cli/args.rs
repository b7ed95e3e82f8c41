//! The clerk's command line: the usage text, the options and the command
//! words, parsed into a `Cli` without touching the network, so every
//! mistake is one line naming what is wrong before anything is sent.

use std::path::PathBuf;
use std::time::Duration;

use crate::check::KvInput;
use crate::clerk::member::{self, MemberCommand};

pub(super) const USAGE: &str = "\
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

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Exit {
    Ok = 0,
    NoMatch = 1,
    Failed = 2,
    Usage = 3,
}

/// One key-value operation, from the command line or a shell line. It has the
/// same shape as a history's input, so a `shell --json` line is exactly the
/// checker's JSON for that operation.
pub(super) type Op = KvInput;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Action {
    Op(Op),
    Status { json: bool },
    Shell { json: bool },
    SnapshotSave { path: PathBuf, node: Option<u64> },
    SnapshotStatus { path: PathBuf, json: bool },
    Member(MemberCommand),
    Help,
}

#[derive(Clone, Debug, PartialEq)]
pub(super) struct Cli {
    pub(super) config: PathBuf,
    pub(super) timeout: Duration,
    pub(super) token: Option<String>,
    pub(super) action: Action,
}

pub(super) fn parse_args(args: &[String]) -> Result<Cli, String> {
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

/// A key-value operation from words: `get KEY`, `put KEY VALUE`, ...
pub(super) fn parse_op(words: &[String]) -> Result<Op, String> {
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
pub(super) fn split_words(line: &str) -> Result<Vec<String>, String> {
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

pub(super) fn parse_json_op(line: &str) -> Result<Op, String> {
    serde_json::from_str(line).map_err(|e| e.to_string())
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
}
