//! The node's HTTP endpoint: `/metrics` (Prometheus text format), `/health`,
//! `/status`, and the live dashboard at `/` with its JSON at
//! `/api/dashboard`. It only reads: the node's status and the process-wide
//! counters of `metrics`; nothing below imports it, and the Raft threads
//! never wait for it.
//!
//! A small HTTP/1.1 server on its own threads, bounded like the RPC server:
//! one acceptor, [`HttpConfig::workers`] worker threads, at most
//! [`HttpConfig::max_queued`] connections waiting for a worker (more are
//! closed at once and counted), one request per connection (`Connection:
//! close`), a request head of at most [`HttpConfig::max_head_bytes`] (else
//! 431) that must arrive whole within [`HttpConfig::head_timeout_ms`] (else
//! 408: a slow client holds a worker no longer than that), and a write
//! timeout. Requests are parsed by `httparse`; only GET and HEAD are served.

mod history;
mod routes;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, TrySendError};

use crate::threads::spawn_watched;

pub use self::routes::{Health, Source};

/// The bounds of the HTTP server.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Threads serving requests, one connection each at a time.
    pub workers: usize,
    /// Accepted connections waiting for a worker; more are closed at once.
    pub max_queued: usize,
    /// The request line and headers, at most.
    pub max_head_bytes: usize,
    /// The whole request head must arrive within this time.
    pub head_timeout_ms: u64,
    /// A response write blocked this long gives up on the client.
    pub write_timeout_ms: u64,
    /// Told when one of the server's threads panics (a node stops itself).
    pub on_panic: crate::threads::OnPanic,
    /// The testing hook (`kvserver --fault-file`): `panic http` in it makes the next
    /// request panic on its HTTP thread. `None` in production.
    pub fault_file: Option<crate::storage::FaultFile>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            workers: 4,
            max_queued: 64,
            max_head_bytes: 8192,
            head_timeout_ms: 2_000,
            write_timeout_ms: 5_000,
            on_panic: crate::threads::OnPanic::default(),
            fault_file: None,
        }
    }
}

/// Headers parsed at most; a request with more is refused (431).
const MAX_HEADERS: usize = 32;

/// A running HTTP endpoint. Dropping it stops it.
pub struct HttpServer {
    local_addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl HttpServer {
    /// Binds `addr` and serves `source` until shut down.
    pub fn start(addr: SocketAddr, source: Source, config: HttpConfig) -> io::Result<HttpServer> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot listen on {addr} (http): {e}"))
        })?;
        let local_addr = listener.local_addr()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let routes = Arc::new(routes::Routes::new(source, Arc::clone(&stopping))?);
        let (queue_tx, queue_rx) = bounded::<TcpStream>(config.max_queued.max(1));
        let mut threads = Vec::new();
        for i in 0..config.workers.max(1) {
            let (queue, routes, config) = (queue_rx.clone(), Arc::clone(&routes), config.clone());
            let on_panic = config.on_panic.clone();
            threads.push(spawn_watched(format!("http-{i}"), on_panic, move || {
                serve(queue, &routes, &config)
            })?);
        }
        let acceptor_stopping = Arc::clone(&stopping);
        threads.push(spawn_watched(
            "http-accept".into(),
            config.on_panic.clone(),
            move || {
                for stream in listener.incoming() {
                    if acceptor_stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else {
                        // Out of descriptors and the like: back off.
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    match queue_tx.try_send(stream) {
                        Ok(()) => {}
                        Err(TrySendError::Full(_)) => routes::CONNECTIONS_REFUSED.inc(),
                        Err(TrySendError::Disconnected(_)) => break,
                    }
                }
            },
        )?);
        let history_stopping = Arc::clone(&stopping);
        let history_routes = Arc::clone(&routes);
        threads.push(spawn_watched(
            "http-history".into(),
            config.on_panic.clone(),
            move || history_routes.sample_every_second(&history_stopping),
        )?);
        Ok(HttpServer {
            local_addr,
            stopping,
            threads,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets the workers finish, and waits for every thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wakes the acceptor blocked in accept().
        let _ = TcpStream::connect_timeout(&self.local_addr, Duration::from_secs(1));
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                log::error!("an http thread panicked");
            }
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One worker: serves one connection at a time until the acceptor is gone.
fn serve(queue: Receiver<TcpStream>, routes: &routes::Routes, config: &HttpConfig) {
    while let Ok(stream) = queue.recv() {
        if let Some(fault_file) = &config.fault_file {
            fault_file.panic_if_requested("http");
        }
        if let Err(e) = serve_connection(stream, routes, config) {
            log::debug!("http: {e}");
        }
    }
}

/// A response: status, content type and body.
pub(crate) struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type,
            body: body.into(),
        }
    }

    pub fn text(status: u16, body: &str) -> Response {
        Response::new(status, "text/plain; charset=utf-8", format!("{body}\n"))
    }

    pub fn json(status: u16, body: String) -> Response {
        Response::new(status, "application/json", body)
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Reads one request head (bounded in bytes and time), answers it, closes.
fn serve_connection(
    mut stream: TcpStream,
    routes: &routes::Routes,
    config: &HttpConfig,
) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(config.head_timeout_ms);
    stream.set_write_timeout(Some(Duration::from_millis(config.write_timeout_ms)))?;
    let mut head = vec![0u8; config.max_head_bytes];
    let mut filled = 0;
    let response = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break (
                Response::text(408, "the request head did not arrive in time"),
                false,
            );
        }
        stream.set_read_timeout(Some(left))?;
        let n = match stream.read(&mut head[filled..]) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        filled += n;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&head[..filled]) {
            Ok(httparse::Status::Complete(_)) => {
                let method = request.method.unwrap_or("");
                let path = request.path.unwrap_or("/");
                let head_only = method == "HEAD";
                break if method == "GET" || head_only {
                    (routes.route(path), head_only)
                } else {
                    (Response::text(405, "only GET and HEAD are served"), false)
                };
            }
            Ok(httparse::Status::Partial) if filled == head.len() => {
                break (
                    Response::text(431, "the request head is larger than this server reads"),
                    false,
                );
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                break (Response::text(431, "too many headers"), false);
            }
            Err(e) => break (Response::text(400, &format!("bad request: {e}")), false),
        }
    };
    let (response, head_only) = response;
    routes::count_response(response.status);
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(&response.body);
    }
    stream.write_all(&out)?;
    let _ = stream.shutdown(std::net::Shutdown::Both);
    Ok(())
}
