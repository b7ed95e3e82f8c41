//! The workers of the Redis listener: the threads that run a connection's batch through
//! its blocking [`Clerk`] when the I/O thread cannot answer it in-process — this node does
//! not lead (the clerk forwards to the leader over RPC), the connection's session is not
//! open yet, a SCAN/KEYS/DBSIZE reads a view, or a first attempt was answered other than
//! OK (the clerk judges it and retries with the same sequence number). A worker holds the
//! connection's clerk while it runs and hands it back with the result.
//!
//! Bounds: at most `max_connections` workers, started as needed (a connection has at most
//! one batch out, so never more are busy), and a queue of at most `max_connections` tasks.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use super::io::{Done, Inbox};
use crate::clerk::Clerk;
use crate::proto::kvstore::{ExecReply, ExecRequest, ReadOp, WriteOp};
use crate::rpc::RpcError;

/// What a worker does with a connection's clerk.
pub enum Job {
    /// A whole Exec: writes (one log entry, the session's next seq) or reads.
    Exec {
        writes: Vec<WriteOp>,
        reads: Vec<ReadOp>,
    },
    /// The rest of an Exec whose first attempt was sent in-process to node `node` at
    /// `started` and answered `first` (see [`Clerk::exec_after`]).
    After {
        node: u64,
        started: Instant,
        request: ExecRequest,
        first: Result<ExecReply, RpcError>,
    },
}

struct Task {
    id: u64,
    clerk: Box<Clerk>,
    job: Job,
    inbox: Arc<Inbox>,
}

pub struct Workers {
    /// `None` once the server stops: the workers then end when the queue is empty.
    tx: Mutex<Option<Sender<Task>>>,
    rx: Receiver<Task>,
    idle: Arc<AtomicUsize>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    max_workers: usize,
}

impl Workers {
    pub fn new(max_workers: usize) -> Workers {
        let (tx, rx) = crossbeam_channel::bounded(max_workers);
        Workers {
            tx: Mutex::new(Some(tx)),
            rx,
            idle: Arc::new(AtomicUsize::new(0)),
            threads: Mutex::new(Vec::new()),
            max_workers,
        }
    }

    /// Queues `job` for connection `id`; its result goes to `inbox` with the clerk.
    pub fn run(&self, id: u64, clerk: Box<Clerk>, job: Job, inbox: Arc<Inbox>) {
        if self.idle.load(Ordering::SeqCst) == 0 {
            self.spawn();
        }
        let task = Task {
            id,
            clerk,
            job,
            inbox,
        };
        let tx = self.tx.lock().clone();
        // Full only past one task per connection, which the connections never have out.
        let sent = tx.is_some_and(|tx| tx.try_send(task).is_ok());
        if !sent {
            log::error!(
                "resp connection {id}: no worker takes its batch (the listener is stopping)"
            );
        }
    }

    /// Starts one more worker, unless `max_workers` run.
    fn spawn(&self) {
        let mut threads = self.threads.lock();
        if threads.len() >= self.max_workers {
            return;
        }
        let rx = self.rx.clone();
        let idle = Arc::clone(&self.idle);
        let spawned = std::thread::Builder::new()
            .name(format!("resp-worker-{}", threads.len()))
            .spawn(move || work(&rx, &idle));
        match spawned {
            Ok(thread) => threads.push(thread),
            Err(e) => log::error!("resp: cannot start a worker: {e}"),
        }
    }

    /// Lets the workers end once the tasks queued are done, and joins them.
    pub fn stop(&self) {
        self.tx.lock().take();
        let threads = std::mem::take(&mut *self.threads.lock());
        for thread in threads {
            let _ = thread.join();
        }
    }
}

fn work(rx: &Receiver<Task>, idle: &AtomicUsize) {
    loop {
        idle.fetch_add(1, Ordering::SeqCst);
        let task = rx.recv();
        idle.fetch_sub(1, Ordering::SeqCst);
        let Ok(Task {
            id,
            mut clerk,
            job,
            inbox,
        }) = task
        else {
            return;
        };
        let result = match job {
            Job::Exec { writes, reads } => clerk.exec(writes, reads),
            Job::After {
                node,
                started,
                request,
                first,
            } => clerk.exec_after(node, started, request, first),
        };
        inbox.push_done(id, Done::Worker(clerk, result));
    }
}
