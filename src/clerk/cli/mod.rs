//! `clerk`, the command-line client, as a library module so the binary is
//! only its entry point: one operation per run (`get`, `put`, `append`,
//! `delete`, `cas`), the cluster's `status`, a `shell`, backups (`snapshot`)
//! and membership changes (`member`, `transfer-leader`).
//!
//! Exit codes: 0 success; 1 key not found or cas not swapped; 2 no answer
//! before the deadline (the outcome of a write is then unknown) or the
//! cluster unreachable; 3 bad usage, a bad config file or a rejected
//! request. Every failure prints one line on stderr naming what is wrong.

mod args;
mod shell;
mod status_table;

use std::process::ExitCode;
use std::time::Duration;

use self::args::{parse_args, Action, Cli, Exit, USAGE};
use crate::clerk::member::{self, MemberCommand};
use crate::clerk::{Clerk, ClerkError, ClerkOptions};
use crate::config::ClusterConfig;
use crate::kv::backup::BackupInfo;
use crate::kv::server::PROMOTE_MAX_LAG_ENTRIES;

/// The per-RPC limit, unless the whole deadline is shorter.
const ATTEMPT_TIMEOUT_MS: u64 = 1_000;

/// Runs the clerk with these arguments (the program name excluded) and
/// returns its exit code.
pub fn main(args: &[String]) -> ExitCode {
    let exit = match parse_args(args) {
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

/// `snapshot status`: checks the file and prints what it holds; exit 3 when it is damaged.
fn run_snapshot_status(path: &std::path::Path, json: bool) -> Exit {
    match crate::kv::backup::inspect(path) {
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

fn describe_backup(info: &BackupInfo, json: bool) -> String {
    if json {
        return serde_json::to_string(info).expect("a backup's description serializes");
    }
    let header = &info.header;
    format!(
        "{}: backup version {} of cluster {:?} from node {}, index {}, term {}, created at {} ms since the epoch; {} keys, {} sessions, {} stream bytes in {} chunks; {} bytes, checksum {:#010x} ok",
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
        Action::Status { json } => Ok(status_table::run_status(&clerk, *json)),
        Action::Shell { json } => shell::run_shell(&mut clerk, *json),
        Action::Op(op) => shell::run_op(&mut clerk, op),
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
