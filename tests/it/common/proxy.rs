//! A fault-injecting HTTP proxy in front of a real S3 server: each request is forwarded to
//! the server, and with probability `rate` (from a seeded generator) one fault is injected
//! instead of, or into, the real answer. One request per connection (the proxy answers with
//! `Connection: close`), which is all object_store's client needs.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// 500 InternalError, the request not forwarded.
    Status500,
    /// 503 SlowDown, the request not forwarded.
    SlowDown,
    /// Forwarded, then the connection closed before any answer (it may have been applied).
    ResetBeforeAnswer,
    /// Forwarded; the answer's headers and half its body, then the connection closed.
    ResetMidBody,
    /// Forwarded, answered after a stall.
    Stall,
    /// Forwarded; a 200 whose body is cut in half, with a Content-Length that matches the cut.
    ShortBody,
}

const FAULTS: [Fault; 6] =
    [Fault::Status500, Fault::SlowDown, Fault::ResetBeforeAnswer, Fault::ResetMidBody, Fault::Stall, Fault::ShortBody];

pub struct Proxy {
    pub port: u16,
    stop: Arc<AtomicBool>,
    /// How many of each fault were injected, and how many requests passed through.
    pub injected: Arc<Mutex<std::collections::HashMap<Fault, u64>>>,
    pub requests: Arc<AtomicU64>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

impl Proxy {
    /// Forward to 127.0.0.1:`upstream`, injecting a fault into about `rate` of the requests.
    pub fn start(upstream: u16, rate: f64, seed: u64) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let injected: Arc<Mutex<std::collections::HashMap<Fault, u64>>> = Arc::default();
        let requests = Arc::new(AtomicU64::new(0));
        let rng = Arc::new(Mutex::new(Rng(seed | 1)));
        let (stop2, inj, reqs) = (stop.clone(), injected.clone(), requests.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (inj, reqs, rng) = (inj.clone(), reqs.clone(), rng.clone());
                std::thread::spawn(move || {
                    let fault = {
                        let mut r = rng.lock().unwrap();
                        let roll = (r.next() % 10_000) as f64 / 10_000.0;
                        (roll < rate).then(|| FAULTS[(r.next() % FAULTS.len() as u64) as usize])
                    };
                    reqs.fetch_add(1, Ordering::SeqCst);
                    if let Ok(Some(f)) = serve(conn, upstream, &|_| fault) {
                        *inj.lock().unwrap().entry(f).or_default() += 1;
                    }
                });
            }
        });
        Proxy { port, stop, injected, requests }
    }

    /// Forward to 127.0.0.1:`upstream`, injecting `fault` into the first `times` GETs whose
    /// request line contains `path`, and nothing else: one fault, where a test wants it.
    pub fn targeted(upstream: u16, path: &'static str, fault: Fault, times: u64) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let injected: Arc<Mutex<std::collections::HashMap<Fault, u64>>> = Arc::default();
        let requests = Arc::new(AtomicU64::new(0));
        let left = Arc::new(AtomicU64::new(times));
        let (stop2, inj, reqs) = (stop.clone(), injected.clone(), requests.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (inj, reqs, left) = (inj.clone(), reqs.clone(), left.clone());
                std::thread::spawn(move || {
                    reqs.fetch_add(1, Ordering::SeqCst);
                    let decide = |head: &str| {
                        let line = head.lines().next().unwrap_or("");
                        let hit = line.starts_with("GET ") && line.contains(path);
                        (hit && left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok())
                            .then_some(fault)
                    };
                    if let Ok(Some(f)) = serve(conn, upstream, &decide) {
                        *inj.lock().unwrap().entry(f).or_default() += 1;
                    }
                });
            }
        });
        Proxy { port, stop, injected, requests }
    }

    pub fn summary(&self) -> String {
        let inj = self.injected.lock().unwrap();
        let mut v: Vec<String> = inj.iter().map(|(f, n)| format!("{f:?} {n}")).collect();
        v.sort();
        format!("{} requests, faults: {}", self.requests.load(Ordering::SeqCst), v.join(", "))
    }
}

/// Read one HTTP message head (up to the blank line) and its body by Content-Length (none
/// for the answer to a HEAD, or a 204/304).
fn read_message(s: &mut TcpStream, no_body: bool) -> std::io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::Error::other("eof in head"));
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let bodiless = no_body || head.starts_with("HTTP/1.1 204") || head.starts_with("HTTP/1.1 304");
    let mut body = vec![0u8; if bodiless { 0 } else { len }];
    s.read_exact(&mut body)?;
    Ok((head, body))
}

/// The head with `Connection: close` and, when given, another Content-Length.
fn rewrite(head: &str, len: Option<usize>) -> String {
    let mut out = String::new();
    for (i, l) in head.split("\r\n").enumerate() {
        if l.is_empty() {
            continue;
        }
        let lower = l.to_ascii_lowercase();
        if i > 0 && (lower.starts_with("connection:") || (len.is_some() && lower.starts_with("content-length:"))) {
            continue;
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    if let Some(n) = len {
        out.push_str(&format!("Content-Length: {n}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    out
}

fn error(s: &mut TcpStream, status: &str, code: &str) -> std::io::Result<()> {
    let body = format!("<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>injected</Message></Error>");
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Serve one request; `decide` picks the fault (if any) from the request head.
fn serve(
    mut client: TcpStream,
    upstream: u16,
    decide: &dyn Fn(&str) -> Option<Fault>,
) -> std::io::Result<Option<Fault>> {
    client.set_read_timeout(Some(Duration::from_secs(60)))?;
    let (head, body) = read_message(&mut client, false)?;
    let fault = decide(&head);
    match fault {
        Some(Fault::Status500) => {
            return error(&mut client, "500 Internal Server Error", "InternalError").map(|_| fault)
        }
        Some(Fault::SlowDown) => return error(&mut client, "503 Slow Down", "SlowDown").map(|_| fault),
        _ => {}
    }
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    up.write_all(rewrite(&head, None).as_bytes())?;
    up.write_all(&body)?;
    let (rhead, rbody) = read_message(&mut up, head.starts_with("HEAD "))?;
    let is_get = head.starts_with("GET ");
    let ok = rhead.starts_with("HTTP/1.1 2");
    match fault {
        Some(Fault::ResetBeforeAnswer) => {
            let _ = client.shutdown(std::net::Shutdown::Both);
            Ok(fault)
        }
        Some(Fault::ResetMidBody) if !rbody.is_empty() => {
            client.write_all(rewrite(&rhead, None).as_bytes())?;
            client.write_all(&rbody[..rbody.len() / 2])?;
            let _ = client.shutdown(std::net::Shutdown::Both);
            Ok(fault)
        }
        Some(Fault::ShortBody) if is_get && ok && rbody.len() > 1 => {
            let cut = &rbody[..rbody.len() / 2];
            client.write_all(rewrite(&rhead, Some(cut.len())).as_bytes())?;
            client.write_all(cut)?;
            Ok(fault)
        }
        Some(Fault::Stall) => {
            std::thread::sleep(Duration::from_secs(2));
            client.write_all(rewrite(&rhead, None).as_bytes())?;
            client.write_all(&rbody)?;
            Ok(fault)
        }
        _ => {
            client.write_all(rewrite(&rhead, None).as_bytes())?;
            client.write_all(&rbody)?;
            Ok(None)
        }
    }
}
