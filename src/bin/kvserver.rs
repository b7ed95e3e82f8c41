//! `kvserver --config FILE --id N [--join [--listen IP:PORT]] [--data-dir DIR]
//! [--log-level LEVEL] [--fault-file PATH]`: runs
//! one node of the cluster in the foreground until SIGTERM or SIGINT, and
//! exits non-zero with one line on stderr when it cannot start or when its
//! storage fails: 2 for a usage or configuration mistake (bad arguments, a
//! bad cluster file, an id the file does not list), 1 for a failure at run
//! time (port in use, data directory locked or damaged, storage errors).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use kvstore_raft::config::ClusterConfig;
use kvstore_raft::http::{HttpConfig, HttpServer, Source};
use kvstore_raft::kv::server::{KvServer, StartError, StartOptions};
use kvstore_raft::resp::RespServer;
use kvstore_raft::storage::FaultFile;

const USAGE: &str = "usage: kvserver --config FILE --id N [--join [--listen IP:PORT]] [--data-dir DIR] [--log-level error|warn|info|debug|trace] [--fault-file PATH]
       kvserver restore --from BACKUP --config FILE --id N [--data-dir DIR]";

/// `kvserver restore ...`: seeds node N's (new, empty) data directory from a backup made by
/// `clerk snapshot save`; every node of the new cluster is seeded from the same backup.
fn restore(argv: &[String]) -> ExitCode {
    let mut opts = getopts::Options::new();
    opts.optopt(
        "",
        "from",
        "the backup file (clerk snapshot save)",
        "BACKUP",
    );
    opts.optopt("", "config", "the new cluster's file", "FILE");
    opts.optopt("", "id", "the node to seed", "N");
    opts.optopt("", "data-dir", "overrides <data_dir>/node<N>", "DIR");
    let parsed = opts.parse(argv).map_err(|e| e.to_string()).and_then(|m| {
        let need = |name: &str| m.opt_str(name).ok_or(format!("--{name} is required"));
        let id = need("id")?;
        let id = id
            .parse::<u64>()
            .map_err(|_| format!("--id {id:?} is not a node id (a positive number)"))?;
        Ok((
            PathBuf::from(need("from")?),
            PathBuf::from(need("config")?),
            id,
            m.opt_str("data-dir").map(PathBuf::from),
        ))
    });
    let (backup, config_path, id, data_dir) = match parsed {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("kvserver restore: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let config = match ClusterConfig::load(&config_path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("kvserver restore: {e}");
            return ExitCode::from(2);
        }
    };
    if config.node(id).is_none() {
        eprintln!(
            "kvserver restore: {}: no node {id} in the cluster file",
            config_path.display()
        );
        return ExitCode::from(2);
    }
    let data_dir = data_dir.unwrap_or_else(|| config.node_data_dir(id));
    match kvstore_raft::kv::backup::restore(&backup, &data_dir, config.engine_cache_bytes) {
        Ok(restored) => {
            let header = &restored.info.header;
            println!(
                "kvserver restore: node {id}: {} seeded from {} (cluster {:?}, index {}, term {}, \
                 {} keys)",
                data_dir.display(),
                backup.display(),
                header.cluster_id,
                header.index,
                header.term,
                restored.info.trailer.keys
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kvserver restore: {e}");
            ExitCode::from(1)
        }
    }
}

struct Args {
    config: PathBuf,
    id: u64,
    data_dir: Option<PathBuf>,
    log_level: log::LevelFilter,
    fault_file: Option<PathBuf>,
    join: bool,
    listen: Option<std::net::SocketAddr>,
}

fn parse_args(argv: &[String]) -> Result<Option<Args>, String> {
    let mut opts = getopts::Options::new();
    opts.optopt("", "config", "the cluster file", "FILE");
    opts.optopt("", "id", "this node's id in the cluster file", "N");
    opts.optopt("", "data-dir", "overrides <data_dir>/node<N>", "DIR");
    opts.optopt(
        "",
        "log-level",
        "error, warn, info (default), debug or trace",
        "LEVEL",
    );
    opts.optopt(
        "",
        "fault-file",
        "testing only: before each fsync, `stall` in this file makes it wait, `fail` makes it fail",
        "PATH",
    );
    opts.optflag(
        "",
        "join",
        "start with no membership and wait to be added (clerk member add)",
    );
    opts.optopt(
        "",
        "listen",
        "with --join: the address to serve on, when the file does not list this id",
        "IP:PORT",
    );
    opts.optflag("h", "help", "print this help");
    let matches = opts.parse(argv).map_err(|e| e.to_string())?;
    if matches.opt_present("help") {
        println!("{}", opts.usage(USAGE));
        return Ok(None);
    }
    if !matches.free.is_empty() {
        return Err(format!("unexpected argument {:?}", matches.free[0]));
    }
    let config = matches.opt_str("config").ok_or("--config is required")?;
    let id = matches.opt_str("id").ok_or("--id is required")?;
    let id = id
        .parse::<u64>()
        .map_err(|_| format!("--id {id:?} is not a node id (a positive number)"))?;
    let listen = match matches.opt_str("listen") {
        None => None,
        Some(text) => Some(
            text.parse::<std::net::SocketAddr>()
                .map_err(|_| format!("--listen {text:?} is not an IP:PORT address"))?,
        ),
    };
    if listen.is_some() && !matches.opt_present("join") {
        return Err("--listen is only for a node started with --join".to_string());
    }
    let log_level = match matches.opt_str("log-level").as_deref().unwrap_or("info") {
        "error" => log::LevelFilter::Error,
        "warn" => log::LevelFilter::Warn,
        "info" => log::LevelFilter::Info,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        other => {
            return Err(format!(
                "--log-level {other:?} is not one of error, warn, info, debug, trace"
            ))
        }
    };
    Ok(Some(Args {
        config: PathBuf::from(config),
        id,
        data_dir: matches.opt_str("data-dir").map(PathBuf::from),
        log_level,
        fault_file: matches.opt_str("fault-file").map(PathBuf::from),
        join: matches.opt_present("join"),
        listen,
    }))
}

/// A `--join` on an empty data directory must be under a new id: one the
/// cluster's membership does not hold (see `clerk::member::join_check`).
fn check_join(
    config: &ClusterConfig,
    args: &Args,
    data_dir: &std::path::Path,
) -> Result<(), String> {
    use kvstore_raft::clerk::member::{join_check, JoinCheck};
    match join_check(config, args.id) {
        JoinCheck::New => Ok(()),
        JoinCheck::Member {
            asked,
            voter,
            match_index,
            address,
        } => Err(format!(
            "--join with an empty data directory {} under the id of a current {} ({address}, \
             match index {match_index}, per node {asked}): a node that lost its disk may not \
             come back under its old id; remove it (clerk member remove {}), then start the \
             replacement with --join under a new id and clerk member add it",
            data_dir.display(),
            if voter { "voter" } else { "learner" },
            args.id
        )),
        JoinCheck::NoAnswer => Err(format!(
            "--join: no node of {} answered, so id {} cannot be checked against the \
             membership; a node joins a running cluster",
            args.config.display(),
            args.id
        )),
        JoinCheck::NoLeader { asked } => Err(format!(
            "--join: node {asked} lists id {} as a learner and no leader answered to tell \
             whether it has received the log; retry once the cluster has a leader",
            args.id
        )),
    }
}

/// Blocks SIGTERM and SIGINT in this thread (and so in every thread it
/// starts), so they can be taken synchronously with `sigtimedwait`.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: plain libc calls on a local, initialized signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits up to `timeout` for SIGTERM or SIGINT; returns the signal, if any.
fn wait_for_stop_signal(set: &libc::sigset_t, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as _,
    };
    // SAFETY: `set` is a valid signal set and `ts` a valid timespec.
    let signal = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (signal > 0).then_some(signal)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("restore") {
        return restore(&argv[1..]);
    }
    let args = match parse_args(&argv) {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("kvserver: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let log_config = simplelog::ConfigBuilder::new()
        .set_thread_level(log::LevelFilter::Off)
        .build();
    // A logger can only fail to install if one already is.
    let _ = simplelog::TermLogger::init(
        args.log_level,
        log_config,
        simplelog::TerminalMode::Stderr,
        simplelog::ColorChoice::Never,
    );
    let config = match ClusterConfig::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("kvserver: {e}");
            return ExitCode::from(2);
        }
    };
    // A wiped disk is a new member: refuse to bootstrap on an empty data
    // directory when the cluster has already started.
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| config.node_data_dir(args.id));
    let empty = std::fs::read_dir(&data_dir).map_or(true, |mut entries| entries.next().is_none());
    if empty && !args.join {
        if let Some((peer, term)) =
            kvstore_raft::clerk::member::started_cluster_peer(&config, args.id)
        {
            eprintln!(
                "kvserver: node {}: data directory {} is empty but the cluster has already \
                 started (node {peer} is at term {term}): a node that lost its disk may not \
                 come back under its old id; remove it (clerk member remove {}) and start a new \
                 node with --join, then clerk member add",
                args.id,
                data_dir.display(),
                args.id
            );
            return ExitCode::from(1);
        }
    }
    if empty && args.join {
        if let Err(message) = check_join(&config, &args, &data_dir) {
            eprintln!("kvserver: node {}: {message}", args.id);
            return ExitCode::from(1);
        }
    }
    let signals = block_stop_signals();
    let start = StartOptions {
        fs: None,
        id: args.id,
        data_dir: args.data_dir,
        link_filter: None,
        fault_file: args.fault_file.clone(),
        join: args.join,
        listen: args.listen,
    };
    let server = match KvServer::start(&config, start) {
        Ok(server) => server,
        // An id the cluster file does not list is a usage mistake, like a
        // bad config: exit 2 and name the file that was read.
        Err(e @ StartError::UnknownId { .. }) => {
            eprintln!("kvserver: {}: {e}", args.config.display());
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("kvserver: node {}: {e}", args.id);
            return ExitCode::from(1);
        }
    };
    log::info!("node {} serving on {}", args.id, server.local_addr());
    // The HTTP endpoint (metrics, health, dashboard), when the file gives
    // this node an `http_port`.
    let http_addr = config.node(args.id).and_then(|node| node.http);
    let http = match http_addr.map(|addr| {
        let http_config = HttpConfig {
            // A panicked HTTP thread stops the node, as any node thread does.
            on_panic: server.handle().stopper().on_panic(),
            fault_file: args.fault_file.as_deref().map(FaultFile::new),
            ..HttpConfig::default()
        };
        HttpServer::start(addr, Source::of(&server, &config), http_config)
    }) {
        None => None,
        Some(Ok(http)) => {
            log::info!("node {}: http on http://{}/", args.id, http.local_addr());
            Some(http)
        }
        Some(Err(e)) => {
            eprintln!("kvserver: node {}: {e}", args.id);
            server.shutdown();
            return ExitCode::from(1);
        }
    };
    // The Redis listener, when the file gives this node a `resp_port`.
    let resp_addr = config.node(args.id).and_then(|node| node.resp);
    let resp = match resp_addr.map(|addr| {
        RespServer::start(
            addr,
            &config,
            args.id,
            server.service(),
            server.handle().clone(),
        )
    }) {
        None => None,
        Some(Ok(resp)) => {
            log::info!("node {}: Redis clients on {}", args.id, resp.local_addr());
            Some(resp)
        }
        Some(Err(e)) => {
            eprintln!("kvserver: node {}: {e}", args.id);
            if let Some(http) = http {
                http.shutdown();
            }
            server.shutdown();
            return ExitCode::from(1);
        }
    };
    let stop = |server: KvServer, http: Option<HttpServer>| {
        if let Some(resp) = resp {
            resp.shutdown();
        }
        if let Some(http) = http {
            http.shutdown();
        }
        server.shutdown();
    };
    loop {
        if let Some(signal) = wait_for_stop_signal(&signals, Duration::from_millis(200)) {
            log::info!("node {}: signal {signal}, shutting down", args.id);
            stop(server, http);
            return ExitCode::SUCCESS;
        }
        if let Some(error) = server.handle().fatal_error() {
            eprintln!("kvserver: node {} stopped: {error}", args.id);
            stop(server, http);
            return ExitCode::from(1);
        }
    }
}
