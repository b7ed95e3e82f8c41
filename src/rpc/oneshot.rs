//! A channel for one answer, whose receiver parks at once instead of spinning.
//!
//! Why not a `crossbeam_channel::bounded(1)`: its blocking `recv` first spins and calls
//! `sched_yield` several times before it parks. A Redis connection thread waits on one
//! answer per batch, and with 50 such threads on 2 cores those yields hand the core from
//! waiting thread to waiting thread: perf on the leader under `redis-benchmark -c 50 -t set`
//! put 21% of its CPU in `sched_yield` context switches (bench/results/
//! 2026-12-07-redis-throughput.md). Here the receiver sleeps on a condition variable until
//! the answer (or the sender's drop) wakes it: one futex wait, one wake.

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crossbeam_channel::{RecvError, RecvTimeoutError, TryRecvError};
use parking_lot::{Condvar, Mutex};

enum State<T> {
    Waiting,
    Sent(T),
    /// Taken by the receiver, or the sender dropped without sending.
    Closed,
}

struct Slot<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

/// Sends the one answer; dropping it unsent wakes the receiver with a disconnection.
pub struct Sender<T>(Arc<Slot<T>>);

/// Receives the one answer.
pub struct Receiver<T>(Arc<Slot<T>>);

/// A sender and its receiver.
pub fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let slot = Arc::new(Slot {
        state: Mutex::new(State::Waiting),
        ready: Condvar::new(),
    });
    (Sender(Arc::clone(&slot)), Receiver(slot))
}

impl<T> Sender<T> {
    /// Delivers `value` (dropped with the slot when the receiver is gone).
    pub fn send(self, value: T) {
        let mut state = self.0.state.lock();
        if matches!(*state, State::Waiting) {
            *state = State::Sent(value);
            self.0.ready.notify_one();
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut state = self.0.state.lock();
        if matches!(*state, State::Waiting) {
            *state = State::Closed;
            self.0.ready.notify_one();
        }
    }
}

impl<T> Receiver<T> {
    /// The answer if it is there; `Empty` while it may still come.
    pub fn try_recv(&self) -> Result<T, TryRecvError> {
        let mut state = self.0.state.lock();
        match std::mem::replace(&mut *state, State::Closed) {
            State::Sent(value) => Ok(value),
            State::Waiting => {
                *state = State::Waiting;
                Err(TryRecvError::Empty)
            }
            State::Closed => Err(TryRecvError::Disconnected),
        }
    }

    /// Waits at most `timeout` for the answer.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<T, RecvTimeoutError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.0.state.lock();
        loop {
            match std::mem::replace(&mut *state, State::Closed) {
                State::Sent(value) => return Ok(value),
                State::Closed => return Err(RecvTimeoutError::Disconnected),
                State::Waiting => *state = State::Waiting,
            }
            if self.0.ready.wait_until(&mut state, deadline).timed_out() {
                return match std::mem::replace(&mut *state, State::Closed) {
                    State::Sent(value) => Ok(value),
                    State::Closed => Err(RecvTimeoutError::Disconnected),
                    State::Waiting => {
                        *state = State::Waiting;
                        Err(RecvTimeoutError::Timeout)
                    }
                };
            }
        }
    }

    /// Waits for the answer, or for the sender to be dropped without one.
    pub fn recv(&self) -> Result<T, RecvError> {
        let mut state = self.0.state.lock();
        loop {
            match std::mem::replace(&mut *state, State::Closed) {
                State::Sent(value) => return Ok(value),
                State::Closed => return Err(RecvError),
                State::Waiting => *state = State::Waiting,
            }
            self.0.ready.wait(&mut state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_sent_from_another_thread_wakes_the_receiver() {
        let (tx, rx) = channel();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(7);
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok(7));
        sender.join().unwrap();
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
    }

    #[test]
    fn a_dropped_sender_disconnects_and_a_silent_one_times_out() {
        let (tx, rx) = channel::<u8>();
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(10)),
            Err(RecvTimeoutError::Timeout)
        );
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        drop(tx);
        assert_eq!(rx.recv(), Err(RecvError));
        let (tx, rx) = channel::<u8>();
        let dropper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(tx);
        });
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(30)),
            Err(RecvTimeoutError::Disconnected)
        );
        dropper.join().unwrap();
    }
}
