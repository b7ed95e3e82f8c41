//! Loopback TCP proxies between the nodes of a process cluster, for real network
//! partitions: node `a` reaches node `b` through a proxy of its own (its cluster file names
//! the proxy's port for `b`), so cutting the link closes every connection between them in
//! both directions — Raft traffic and the forwarding of client commands alike — and refuses
//! new ones until the test heals it. Nothing in the nodes knows; no privilege needed.
//!
//! Bounds: one acceptor thread per directed link, at most `MAX_CONNECTIONS_PER_LINK` live
//! connections per link (two copy threads each); a proxy that is dropped stops them all.

use std::collections::HashSet;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

const MAX_CONNECTIONS_PER_LINK: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

type Live = (u64, u64, TcpStream, TcpStream, Arc<AtomicBool>);

struct Shared {
    /// Directed links (from, to) that are cut.
    cut: Mutex<HashSet<(u64, u64)>>,
    /// Live connections: (from, to, the two sockets, set once either copier ended).
    live: Mutex<Vec<Live>>,
    stopping: AtomicBool,
}

/// Every directed link of a cluster, each a proxy on a port of its own.
pub struct Proxies {
    shared: Arc<Shared>,
    /// (from, to) -> the proxy's port.
    ports: Vec<(u64, u64, u16)>,
    acceptors: Vec<JoinHandle<()>>,
    copiers: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxies {
    /// A proxy for each ordered pair of `targets` (node id, real address), listening on the
    /// next of `ports` (at least [`Proxies::links`] of them).
    pub fn start(targets: &[(u64, SocketAddr)], ports: &[u16]) -> Proxies {
        let shared = Arc::new(Shared {
            cut: Mutex::new(HashSet::new()),
            live: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
        });
        let copiers = Arc::new(Mutex::new(Vec::new()));
        let mut links = Vec::new();
        let mut acceptors = Vec::new();
        let mut free = ports.iter();
        for &(from, _) in targets {
            for &(to, target) in targets.iter().filter(|(to, _)| *to != from) {
                let port = *free.next().expect("a port for every link");
                let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind a proxy port");
                links.push((from, to, port));
                let (shared, copiers) = (Arc::clone(&shared), Arc::clone(&copiers));
                acceptors.push(std::thread::spawn(move || {
                    accept_loop(&listener, from, to, target, &shared, &copiers)
                }));
            }
        }
        Proxies {
            shared,
            ports: links,
            acceptors,
            copiers,
        }
    }

    /// How many proxies `nodes` nodes need.
    pub fn links(nodes: usize) -> usize {
        nodes * (nodes - 1)
    }

    /// The port through which `from` reaches `to`.
    pub fn port(&self, from: u64, to: u64) -> u16 {
        self.ports
            .iter()
            .find(|(f, t, _)| (*f, *t) == (from, to))
            .map(|(_, _, port)| *port)
            .expect("a proxy for the link")
    }

    /// Cuts `id` off from every other node, both ways: open connections are shut down and
    /// new ones closed at once.
    pub fn isolate(&self, id: u64) {
        let mut cut = self.shared.cut.lock().unwrap();
        for &(from, to, _) in &self.ports {
            if from == id || to == id {
                cut.insert((from, to));
            }
        }
        drop(cut);
        self.shared
            .live
            .lock()
            .unwrap()
            .retain(|(from, to, a, b, _)| {
                if *from == id || *to == id {
                    let _ = a.shutdown(Shutdown::Both);
                    let _ = b.shutdown(Shutdown::Both);
                    false
                } else {
                    true
                }
            });
    }

    /// Joins every link again.
    pub fn heal(&self) {
        self.shared.cut.lock().unwrap().clear();
    }
}

impl Drop for Proxies {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for (_, _, port) in &self.ports {
            // Wakes the acceptor, which sees `stopping`.
            let _ = TcpStream::connect(("127.0.0.1", *port));
        }
        for (_, _, a, b, _) in self.shared.live.lock().unwrap().drain(..) {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
        for acceptor in self.acceptors.drain(..) {
            let _ = acceptor.join();
        }
        for copier in self.copiers.lock().unwrap().drain(..) {
            let _ = copier.join();
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    from: u64,
    to: u64,
    target: SocketAddr,
    shared: &Arc<Shared>,
    copiers: &Mutex<Vec<JoinHandle<()>>>,
) {
    for incoming in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = incoming else { continue };
        if shared.cut.lock().unwrap().contains(&(from, to)) {
            continue; // dropped: closed at once
        }
        {
            let mut live = shared.live.lock().unwrap();
            live.retain(|(.., done)| !done.load(Ordering::SeqCst));
            let on_link = live.iter().filter(|(f, t, ..)| (*f, *t) == (from, to));
            if on_link.count() >= MAX_CONNECTIONS_PER_LINK {
                continue;
            }
        }
        let Ok(server) = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) else {
            continue;
        };
        let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        let (Ok(client3), Ok(server3)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        let done = Arc::new(AtomicBool::new(false));
        {
            // Registered under the lock that `isolate` takes, after checking the cut again:
            // a link cut meanwhile closes this connection too.
            let mut live = shared.live.lock().unwrap();
            if shared.cut.lock().unwrap().contains(&(from, to)) {
                continue;
            }
            live.push((from, to, client3, server3, Arc::clone(&done)));
        }
        let mut copiers = copiers.lock().unwrap();
        copiers.retain(|c| !c.is_finished());
        let done2 = Arc::clone(&done);
        copiers.push(std::thread::spawn(move || pipe(client, server, &done)));
        copiers.push(std::thread::spawn(move || pipe(server2, client2, &done2)));
    }
}

/// Copies `from` to `to` until either side closes, then closes both.
fn pipe(mut from: TcpStream, mut to: TcpStream, done: &AtomicBool) {
    let _: io::Result<u64> = io::copy(&mut from, &mut to);
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
    done.store(true, Ordering::SeqCst);
}
