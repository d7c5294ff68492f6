//! Opening a world's connections: the higher rank of each pair connects and proves the
//! cluster key in an HMAC challenge-response ([`crate::wire`] has the bytes); the lower rank
//! accepts, checking each accepted connection's hello on a thread of its own under a short
//! deadline, so a silent, slow or hostile connection on the port costs the load nothing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::wire::{self, HelloError, CHALLENGE_LEN, HELLO_LEN, NONCE_LEN, VERDICT_LEN};
use crate::CommError;

/// How long an accepted connection has to send its hello after the challenge. A real peer
/// answers in microseconds; a connection that says nothing is dropped after this.
pub(crate) const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// Hellos checked at once; connections beyond this are closed unread (bounded threads).
const MAX_PENDING_HELLOS: usize = 64;

/// Pause before a connector tries again after a refusal it may outlive (a stale session).
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// What one rank's opening of its connections is about: the same for every pair.
pub(crate) struct Opening<'k> {
    /// This process's world rank.
    pub(crate) rank: usize,
    /// Ranks in the world.
    pub(crate) world: usize,
    /// The load every hello must name.
    pub(crate) session: u64,
    /// The cluster key (empty: none configured).
    pub(crate) key: &'k [u8],
    /// When the whole opening gives up.
    pub(crate) deadline: Instant,
    /// The time it was given, for errors.
    pub(crate) connect_within: Duration,
}

/// Connects to the lower rank `peer` listening at `addr`, retrying until the deadline while
/// the peer is not up yet or is at another session. The stream comes back with no timeouts
/// set.
pub(crate) fn connect_peer(o: &Opening<'_>, peer: usize, addr: &SocketAddr) -> Result<TcpStream, CommError> {
    let Opening { rank, session, key, deadline, connect_within, .. } = *o;
    loop {
        let s = connect_until(addr, deadline).map_err(|e| io_err(peer, e))?;
        let err = match hello_out(&s, rank, peer, session, key, deadline) {
            Ok(()) => return Ok(s),
            Err(Out::Fatal(e)) => return Err(e),
            Err(Out::Retry(e)) => e,
        };
        if Instant::now() + RETRY_PAUSE >= deadline {
            return Err(match err {
                OutErr::Silent => CommError::Timeout { peer, timeout: connect_within },
                OutErr::Io(e) => io_err(peer, e),
                OutErr::Stale => CommError::Refused { peer, reason: format!("still at another session after {connect_within:?}") },
            });
        }
        std::thread::sleep(RETRY_PAUSE);
    }
}

enum OutErr {
    /// The peer's listener did not answer before the deadline (its load has not started).
    Silent,
    /// The connection failed (a peer restarting).
    Io(std::io::Error),
    /// The peer is at another session.
    Stale,
}

enum Out {
    Retry(OutErr),
    Fatal(CommError),
}

/// The connector's side of the hello on `s`.
fn hello_out(mut s: &TcpStream, rank: usize, peer: usize, session: u64, key: &[u8], deadline: Instant) -> Result<(), Out> {
    let retry = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Out::Retry(OutErr::Silent),
        _ => Out::Retry(OutErr::Io(e)),
    };
    let left = || Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)));
    s.set_nodelay(true).map_err(retry)?;
    // The peer sends its challenge once its load reaches the accept loop: wait for it as long
    // as the whole connect may take.
    s.set_read_timeout(left()).map_err(retry)?;
    let mut challenge = [0u8; CHALLENGE_LEN];
    s.read_exact(&mut challenge).map_err(retry)?;
    let nonce_a = wire::parse_challenge(&challenge)
        .map_err(|_| Out::Fatal(CommError::Io { peer, message: "the listener at this address is not a tpserve collective (no challenge)".into() }))?;
    let nonce_c = nonce().map_err(|e| Out::Fatal(io_err(rank, e)))?;
    s.set_write_timeout(Some(HELLO_TIMEOUT)).map_err(retry)?;
    s.write_all(&wire::hello(key, session, rank, peer, &nonce_a, &nonce_c)).map_err(retry)?;
    s.set_read_timeout(Some(HELLO_TIMEOUT)).map_err(retry)?;
    let mut verdict = [0u8; VERDICT_LEN];
    s.read_exact(&mut verdict).map_err(retry)?;
    match wire::verify_verdict(key, session, rank, peer, &nonce_a, &nonce_c, &verdict) {
        Ok(()) => Ok(()),
        Err(e) if e.is_stale() => Err(Out::Retry(OutErr::Stale)),
        Err(e) => Err(Out::Fatal(CommError::Refused { peer, reason: e.to_string() })),
    }
}

/// One accepted connection's hello, checked.
struct Checked {
    from: SocketAddr,
    result: Result<(usize, TcpStream), InErr>,
}

enum InErr {
    Hello(HelloError),
    Io(std::io::Error),
}

/// Accepts every rank above this one on `listener` until the deadline: each accepted connection
/// gets a challenge and [`HELLO_TIMEOUT`] to answer it on a thread of its own; those that do
/// not prove the key for this session and a rank not yet connected are logged and dropped.
/// Returns `streams[p]` for every `p > rank`, with no timeouts set.
pub(crate) fn accept_peers(o: &Opening<'_>, listener: &TcpListener) -> Result<Vec<Option<TcpStream>>, CommError> {
    let Opening { rank, world, session, key, deadline, connect_within } = *o;
    let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
    // The rank's address each connection that failed to prove it came from, for the error.
    let mut unproven: Vec<Option<SocketAddr>> = vec![None; world];
    let key: Arc<[u8]> = Arc::from(key);
    let pending = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel::<Checked>();
    listener.set_nonblocking(true).map_err(|e| io_err(rank, e))?;
    let mut missing = world - rank - 1;
    while missing > 0 {
        while let Ok(c) = rx.try_recv() {
            match c.result {
                Ok((peer, s)) => {
                    // A peer that reconnected (it lost our verdict) replaces its old stream.
                    if streams[peer].replace(s).is_none() {
                        missing -= 1;
                    }
                }
                Err(InErr::Hello(e)) => {
                    if let HelloError::BadProof { claimed } = e {
                        if let Some(slot) = usize::try_from(claimed).ok().and_then(|p| unproven.get_mut(p)) {
                            *slot = Some(c.from);
                        }
                    }
                    tracing::warn!(peer = %c.from, rank, session, "refused a collective connection: {e}");
                }
                Err(InErr::Io(e)) => tracing::warn!(peer = %c.from, rank, "dropped a collective connection that sent no hello: {e}"),
            }
        }
        if missing == 0 {
            break;
        }
        match listener.accept() {
            Ok((s, from)) => {
                if pending.load(Ordering::Relaxed) >= MAX_PENDING_HELLOS {
                    tracing::warn!(peer = %from, rank, "closed a collective connection unread: {MAX_PENDING_HELLOS} hellos already pending");
                    continue;
                }
                pending.fetch_add(1, Ordering::Relaxed);
                let (tx, key, pending) = (tx.clone(), Arc::clone(&key), Arc::clone(&pending));
                let spawned = std::thread::Builder::new().name(format!("comm-hello-{rank}")).spawn(move || {
                    let result = hello_in(s, rank, world, session, &key);
                    pending.fetch_sub(1, Ordering::Relaxed);
                    // The load may be over (connected or failed): then the stream just closes.
                    let _ = tx.send(Checked { from, result });
                });
                if let Err(e) = spawned {
                    return Err(io_err(rank, e));
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::Interrupted) => {
                if Instant::now() >= deadline {
                    let peer = (rank + 1..world).find(|&p| streams[p].is_none()).unwrap_or(rank);
                    return Err(match unproven[peer] {
                        Some(from) => CommError::Refused {
                            peer,
                            reason: format!("a connection from {from} claimed to be it but did not prove the cluster token (do all ranks share one token?)"),
                        },
                        None => CommError::Timeout { peer, timeout: connect_within },
                    });
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(io_err(rank, e)),
        }
    }
    Ok(streams)
}

/// The acceptor's side of the hello on `s`, under [`HELLO_TIMEOUT`] for each read and write.
fn hello_in(mut s: TcpStream, rank: usize, world: usize, session: u64, key: &[u8]) -> Result<(usize, TcpStream), InErr> {
    s.set_nonblocking(false).map_err(InErr::Io)?;
    s.set_nodelay(true).map_err(InErr::Io)?;
    s.set_read_timeout(Some(HELLO_TIMEOUT)).map_err(InErr::Io)?;
    s.set_write_timeout(Some(HELLO_TIMEOUT)).map_err(InErr::Io)?;
    let nonce_a = nonce().map_err(InErr::Io)?;
    s.write_all(&wire::challenge(&nonce_a)).map_err(InErr::Io)?;
    let mut hello = [0u8; HELLO_LEN];
    s.read_exact(&mut hello).map_err(InErr::Io)?;
    match wire::verify_hello(key, session, rank, world, &nonce_a, &hello) {
        Ok(h) => {
            s.write_all(&wire::accept(key, session, rank, &h, &nonce_a)).map_err(InErr::Io)?;
            Ok((h.rank, s))
        }
        Err(e) => {
            // Say why, so a stale peer retries and a wrong token fails at once; best effort.
            let _ = s.write_all(&wire::refuse(&e));
            Err(InErr::Hello(e))
        }
    }
}

fn nonce() -> std::io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut n).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(n)
}

fn connect_until(addr: &SocketAddr, deadline: Instant) -> std::io::Result<TcpStream> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(addr, left.max(Duration::from_millis(1))) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

pub(crate) fn io_err(peer: usize, e: std::io::Error) -> CommError {
    CommError::Io { peer, message: e.to_string() }
}
