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
