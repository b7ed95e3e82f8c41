//! Threads whose panic is reported instead of silently ending them. A node is
//! a set of threads (the Raft threads, the RPC server's acceptor, flusher and
//! connection threads, the HTTP threads): if one of them dies, the node may go
//! on leading in Raft while serving nothing, and the cluster never fails over.
//! So every such thread runs under [`spawn_watched`], which catches a panic and
//! hands one line naming the thread and the panic to an [`OnPanic`] hook; the
//! node's hook stops the node with that line, exactly as a failed fsync does.
//! This module sits below `rpc`, `http` and `node`, which all use it.

use std::sync::Arc;
use std::thread::JoinHandle;

/// What to do with the line a panicked thread leaves: `"thread NAME panicked: MESSAGE"`.
#[derive(Clone)]
pub struct OnPanic(Arc<dyn Fn(String) + Send + Sync>);

impl OnPanic {
    pub fn new(hook: impl Fn(String) + Send + Sync + 'static) -> OnPanic {
        OnPanic(Arc::new(hook))
    }

    /// Only logs the line (servers run on their own, as in tests).
    pub fn log_only() -> OnPanic {
        OnPanic::new(|line| log::error!("{line}"))
    }

    fn report(&self, line: String) {
        (self.0)(line)
    }
}

impl std::fmt::Debug for OnPanic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnPanic")
    }
}

impl Default for OnPanic {
    fn default() -> OnPanic {
        OnPanic::log_only()
    }
}

/// The priority ([`lower_priority`]) of a snapshot's sender and bulk load: at nice 10 a
/// thread weighs about a tenth of a normal one when they compete for a core. Measured at
/// 3 M keys under 64 writing clients (bench/results/2026-12-08-scale-10m-stream/): the
/// clients' per-second p99 during the transfer went from 27 ms (median; worst 72 ms) to
/// 10 ms (worst 18 ms), the catch-up from 5.7 s to 6.9 s.
pub const BULK_WORK_NICE: i32 = 10;

/// Runs on a thread doing bulk work: lowers its priority to [`BULK_WORK_NICE`], or says in
/// the log why it could not (the work goes on at the normal priority).
pub fn yield_to_clients(what: &str) {
    if let Err(e) = lower_priority(BULK_WORK_NICE) {
        log::warn!("{what}: cannot lower the thread's priority: {e}");
    }
}

/// Lowers the calling thread's CPU priority to `nice` (1-19; Linux schedules threads apart,
/// so only this thread is affected), for bulk work that should yield the CPU to the threads
/// answering clients when both want it, and use it fully when they do not: a snapshot's
/// sender and bulk load. Threads it starts afterwards inherit the priority. An unprivileged
/// thread cannot raise it again: call it only on threads that end with their work.
pub fn lower_priority(nice: i32) -> std::io::Result<()> {
    assert!(
        (1..=19).contains(&nice),
        "nice {nice} is not a lower priority"
    );
    // SAFETY: gettid, getpriority and setpriority take no pointers and act on the calling
    // thread only.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    if unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) } >= nice {
        // Already as low (a node started under `nice`): never raised.
        return Ok(());
    }
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Starts the thread `name` running `body`; a panic in it is caught and reported to
/// `on_panic` as one line naming the thread and the panic.
pub fn spawn_watched<F>(name: String, on_panic: OnPanic, body: F) -> std::io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
                on_panic.report(format!(
                    "thread {name} panicked: {}",
                    panic_message(panic.as_ref())
                ));
            }
        })
}

/// The text a panic was raised with (`panic!("...")` gives a `&str` or a `String`).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        text.to_string()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    fn my_nice() -> i32 {
        // SAFETY: as in `lower_priority`.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
        unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) }
    }

    /// Only the thread that asks is lowered: the one that started it keeps its priority.
    #[test]
    fn yield_to_clients_lowers_only_the_calling_thread() {
        let before = my_nice();
        let lowered = std::thread::spawn(|| {
            yield_to_clients("test");
            my_nice()
        })
        .join()
        .unwrap();
        assert_eq!(lowered, BULK_WORK_NICE.max(before));
        assert_eq!(my_nice(), before);
    }

    #[test]
    fn a_panic_is_reported_with_the_thread_name_and_message() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let hook = {
            let seen = Arc::clone(&seen);
            OnPanic::new(move |line| seen.lock().push(line))
        };
        spawn_watched("worker-1".into(), hook.clone(), || panic!("boom {}", 7))
            .unwrap()
            .join()
            .unwrap();
        spawn_watched("worker-2".into(), hook, || {})
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(
            *seen.lock(),
            vec!["thread worker-1 panicked: boom 7".to_string()]
        );
    }
}
