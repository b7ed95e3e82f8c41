//! `clerk`: the command-line client. Everything but the entry point lives in
//! `kvstore_raft::clerk::cli`; `clerk --help` lists the commands.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    kvstore_raft::clerk::cli::main(&args)
}
