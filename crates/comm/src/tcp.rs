//! The TCP collective: persistent connections between every pair of ranks (TCP_NODELAY,
//! length-prefixed frames of little-endian f32), with a deadline on every wait so a dead or
//! partitioned peer becomes an error on every rank instead of a hang.
//!
//! All-reduce picks its algorithm by size: below [`TcpCollective::split_threshold`] bytes every
//! rank sends its whole buffer to every other (one round trip, latency-optimal); above it, a
//! reduce-scatter then all-gather moves `2 (w-1)/w` of the buffer per rank (the bandwidth of a
//! ring, in two rounds). Both add the ranks' parts in one fixed tree ([`crate::tree_sum`]), so
//! every rank gets bit-identical results and they equal a one-process sum of the same parts.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{Collective, CommError};

/// Buffers at least this large (in bytes) use reduce-scatter + all-gather: measured on
/// loopback (2 cores), direct wins up to 4 KB at worlds 2 and 4, the split from 64 KB on
/// (`measure_direct_vs_split_all_reduce`, docs/PERFORMANCE.md).
pub const DEFAULT_SPLIT_THRESHOLD: usize = 32 * 1024;

/// How long a receive polls its socket (yielding the core between polls) before it blocks.
/// A step's many small all-reduces each wait a few tens of microseconds for a peer; waking
/// from a blocking read adds the scheduler's latency to every one of them, polling does not,
/// and yielding lets a peer that shares the core run.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(100);

/// Frames up to this size are written without a helper thread.
const INLINE_SEND_BYTES: usize = 32 * 1024;

/// Frames longer than this are refused as corrupt (a wrong length must not allocate).
const MAX_FRAME_BYTES: u64 = 1 << 32;

/// One peer: separate read and write handles so a rank can send and receive at once.
struct Peer {
    reader: Mutex<TcpStream>,
    writer: Mutex<TcpStream>,
}

/// A group of ranks connected over TCP: the whole world ([`TcpCollective::connect`]) or a
/// subgroup of it ([`TcpCollective::subgroup`]) sharing the world's connections.
pub struct TcpCollective {
    /// This process's rank within the group.
    rank: usize,
    /// Ranks in the group (`members.len()`).
    world: usize,
    /// `members[g]` is the world rank of group rank g.
    members: Vec<usize>,
    /// `peers[w]` is the connection to world rank w (None for this process).
    peers: Arc<Vec<Option<Peer>>>,
    /// The deadline of every read and write on this group's connections.
    timeout: Duration,
    /// Bytes from which all-reduce uses reduce-scatter + all-gather (see [`DEFAULT_SPLIT_THRESHOLD`]).
    split_threshold: usize,
    /// How long a receive polls for data before it sleeps in the kernel (see [`DEFAULT_SPIN`]).
    spin: Duration,
}

impl TcpCollective {
    /// Connects this rank to every other. `listener` is this rank's bound listener (its
    /// address is `addrs[rank]`); lower ranks accept, higher ranks connect, and each
    /// connection opens with the connecting rank's hello. Every step is bounded by `timeout`.
    pub fn connect(rank: usize, listener: &TcpListener, addrs: &[SocketAddr], timeout: Duration) -> Result<Self, CommError> {
        Self::connect_within(rank, listener, addrs, 0, &[], timeout, timeout)
    }

    /// [`connect`](Self::connect), waiting up to `connect_within` for every peer to come
    /// (peers may start late), with `timeout` on every later wait. Every hello carries
    /// `session` and proves the cluster secret `key` (see [`hello`]); a connection with
    /// another session (left in the listener's backlog by an earlier, failed attempt), a
    /// wrong proof, or no hello within [`HELLO_WAIT`] is dropped, not mistaken for a peer,
    /// and never holds up the others: hellos are read from every pending connection at once.
    pub fn connect_within(
        rank: usize,
        listener: &TcpListener,
        addrs: &[SocketAddr],
        session: u64,
        key: &[u8],
        connect_within: Duration,
        timeout: Duration,
    ) -> Result<Self, CommError> {
        let world = addrs.len();
        if rank >= world {
            return Err(CommError::BadRank { rank, world });
        }
        let deadline = Instant::now() + connect_within;
        let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        // Connect to every lower rank, announcing ourselves.
        for (peer, addr) in addrs.iter().enumerate().take(rank) {
            let mut s = connect_until(addr, deadline).map_err(|e| io_err(peer, e))?;
            setup(&s, timeout).map_err(|e| io_err(peer, e))?;
            s.write_all(&hello(key, session, rank, peer)).map_err(|e| io_err(peer, e))?;
            streams[peer] = Some(s);
        }
        // Accept every higher rank; read the hellos of all pending connections at once.
        listener.set_nonblocking(true).map_err(|e| io_err(rank, e))?;
        let mut pending: Vec<Pending> = Vec::new();
        let mut missing = world - rank - 1;
        while missing > 0 {
            let mut idle = true;
            match listener.accept() {
                Ok((s, from)) => {
                    idle = false;
                    // Non-blocking until its hello is complete.
                    if s.set_nonblocking(true).is_ok() {
                        pending.push(Pending { s, from, got: Vec::with_capacity(HELLO_LEN), since: Instant::now() });
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(io_err(rank, e)),
            }
            let mut i = 0;
            while i < pending.len() {
                match pending[i].poll() {
                    Poll::Waiting if pending[i].since.elapsed() < HELLO_WAIT => i += 1,
                    Poll::Waiting => {
                        warn_refused(&pending[i].from, "sent no complete hello in time");
                        pending.swap_remove(i);
                    }
                    Poll::Closed => {
                        pending.swap_remove(i);
                    }
                    Poll::Hello(h) => {
                        idle = false;
                        let p = pending.swap_remove(i);
                        let Some(peer) = check_hello(&h, key, session, rank, world) else {
                            warn_refused(&p.from, "sent a hello of another session or without the cluster's secret");
                            continue;
                        };
                        if peer <= rank || streams[peer].is_some() {
                            return Err(CommError::Io { peer, message: format!("unexpected hello from rank {peer}") });
                        }
                        p.s.set_nonblocking(false).map_err(|e| io_err(peer, e))?;
                        setup(&p.s, timeout).map_err(|e| io_err(peer, e))?;
                        streams[peer] = Some(p.s);
                        missing -= 1;
                    }
                }
            }
            if missing > 0 && idle {
                if Instant::now() >= deadline {
                    let peer = (rank + 1..world).find(|&p| streams[p].is_none()).unwrap_or(rank);
                    return Err(CommError::Timeout { peer, timeout: connect_within });
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let mut peers = Vec::with_capacity(world);
        for (peer, s) in streams.into_iter().enumerate() {
            peers.push(match s {
                Some(s) => {
                    let w = s.try_clone().map_err(|e| io_err(peer, e))?;
                    Some(Peer { reader: Mutex::new(s), writer: Mutex::new(w) })
                }
                None => None,
            });
        }
        Ok(Self { rank, world, members: (0..world).collect(), peers: Arc::new(peers), timeout, split_threshold: DEFAULT_SPLIT_THRESHOLD, spin: DEFAULT_SPIN })
    }

    /// The group of world ranks `members` (in group-rank order), which must include this
    /// process. It shares this world's connections: two groups may be used at once as long as
    /// no pair of ranks is in both (a stage's tensor-parallel group and a pipeline group
    /// never share a pair), since a pair's frames arrive in order on one connection.
    pub fn subgroup(&self, members: &[usize]) -> Result<TcpCollective, CommError> {
        let me = self.members[self.rank];
        let world = self.peers.len();
        if let Some(&bad) = members.iter().find(|&&m| m >= world) {
            return Err(CommError::BadRank { rank: bad, world });
        }
        let rank = members.iter().position(|&m| m == me).ok_or(CommError::BadRank { rank: me, world: members.len() })?;
        Ok(TcpCollective {
            rank,
            world: members.len(),
            members: members.to_vec(),
            peers: Arc::clone(&self.peers),
            timeout: self.timeout,
            split_threshold: self.split_threshold,
            spin: self.spin,
        })
    }

    /// Sets the size (bytes) from which all-reduce uses reduce-scatter + all-gather.
    pub fn with_split_threshold(mut self, bytes: usize) -> Self {
        self.split_threshold = bytes;
        self
    }

    /// Sets the deadline of every wait on this group's connections (only this group's
    /// pairs: a pipeline group may wait a whole stage's compute, a tensor group only a skew).
    pub fn with_io_timeout(mut self, timeout: Duration) -> Result<Self, CommError> {
        for g in (0..self.world).filter(|&g| g != self.rank) {
            let p = self.peer(g)?;
            let set = |s: &TcpStream| s.set_read_timeout(Some(timeout)).and_then(|()| s.set_write_timeout(Some(timeout)));
            let r = p.reader.lock().map_err(|_| CommError::Io { peer: self.members[g], message: "connection poisoned".into() })?;
            set(&r).map_err(|e| io_err(self.members[g], e))?;
        }
        self.timeout = timeout;
        Ok(self)
    }

    /// Sets how long a receive polls before it blocks (zero: block at once).
    pub fn with_spin(mut self, spin: Duration) -> Self {
        self.spin = spin;
        self
    }

    /// The size (bytes) from which all-reduce uses reduce-scatter + all-gather.
    pub fn split_threshold(&self) -> usize {
        self.split_threshold
    }

    /// The connection to group rank `peer`.
    fn peer(&self, peer: usize) -> Result<&Peer, CommError> {
        self.members
            .get(peer)
            .filter(|_| peer != self.rank)
            .and_then(|&w| self.peers.get(w))
            .and_then(|p| p.as_ref())
            .ok_or(CommError::BadRank { rank: peer, world: self.world })
    }

    fn send_to(&self, peer: usize, buf: &[f32]) -> Result<(), CommError> {
        let p = self.peer(peer)?;
        let mut w = p.writer.lock().map_err(|_| CommError::Io { peer, message: "connection poisoned".into() })?;
        let mut bytes = Vec::with_capacity(8 + 4 * buf.len());
        bytes.extend_from_slice(&((4 * buf.len()) as u64).to_le_bytes());
        for v in buf {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        w.write_all(&bytes).map_err(|e| self.wait_err(peer, e))
    }

    /// Receives one frame from `peer` (of any length).
    fn recv_from(&self, peer: usize) -> Result<Vec<f32>, CommError> {
        self.recv_frame(peer, None, "recv")
    }

    /// Receives one frame from `peer`; with `expect`, its length header must say exactly
    /// that many values, checked before anything is allocated.
    fn recv_frame(&self, peer: usize, expect: Option<usize>, op: &'static str) -> Result<Vec<f32>, CommError> {
        let p = self.peer(peer)?;
        let mut r = p.reader.lock().map_err(|_| CommError::Io { peer, message: "connection poisoned".into() })?;
        self.poll_readable(&r);
        let mut len = [0u8; 8];
        r.read_exact(&mut len).map_err(|e| self.wait_err(peer, e))?;
        let len = u64::from_le_bytes(len);
        if len > MAX_FRAME_BYTES || len % 4 != 0 {
            return Err(CommError::Io { peer: self.world_rank(peer), message: format!("corrupt frame length {len}") });
        }
        if let Some(n) = expect.filter(|&n| n as u64 * 4 != len) {
            return Err(CommError::LengthMismatch { op, local: n, peer: self.world_rank(peer), remote: (len / 4) as usize });
        }
        let mut bytes = vec![0u8; len as usize];
        r.read_exact(&mut bytes).map_err(|e| self.wait_err(peer, e))?;
        Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// Polls `s` for up to `self.spin` until it has data (or an error or end of stream to
    /// report), so the blocking read that follows returns at once instead of waiting to be
    /// woken. The poll is a non-blocking peek flag on each call (MSG_DONTWAIT), not a socket
    /// mode, because this socket's writer may be sending on another thread.
    fn poll_readable(&self, s: &TcpStream) {
        if self.spin.is_zero() {
            return;
        }
        use std::os::fd::AsRawFd;
        let fd = s.as_raw_fd();
        let start = Instant::now();
        let mut byte = 0u8;
        loop {
            // SAFETY: `fd` is an open socket owned by `s` for this call; the buffer is one
            // valid byte; MSG_PEEK leaves the data in the socket.
            let n = unsafe { libc::recv(fd, (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
            if n >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock || start.elapsed() >= self.spin {
                return;
            }
            std::thread::yield_now();
        }
    }

    /// Receives one frame of exactly `n` values.
    fn recv_exact(&self, peer: usize, n: usize, op: &'static str) -> Result<Vec<f32>, CommError> {
        self.recv_frame(peer, Some(n), op)
    }

    /// The world rank of group rank `peer`, for error messages.
    fn world_rank(&self, peer: usize) -> usize {
        self.members.get(peer).copied().unwrap_or(peer)
    }

    fn wait_err(&self, peer: usize, e: std::io::Error) -> CommError {
        let peer = self.world_rank(peer);
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => CommError::Timeout { peer, timeout: self.timeout },
            _ => io_err(peer, e),
        }
    }

    /// Sends `data_for(p)` to every peer `p` in `others` while receiving one frame from each,
    /// in the order of `others`. Small frames are written inline (the kernel's socket buffers
    /// hold them, so two ranks writing to each other cannot block); larger ones get one sender
    /// thread each so no send waits on another.
    fn send_all_recv_all<'d>(
        &self,
        others: &[usize],
        data_for: impl Fn(usize) -> &'d [f32] + Sync,
        recv: impl Fn(usize) -> Result<Vec<f32>, CommError>,
    ) -> Result<Vec<Vec<f32>>, CommError> {
        if others.iter().all(|&p| 4 * data_for(p).len() <= INLINE_SEND_BYTES) {
            for &p in others {
                self.send_to(p, data_for(p))?;
            }
            return others.iter().map(|&p| recv(p)).collect();
        }
        std::thread::scope(|s| {
            let senders: Vec<_> = others
                .iter()
                .map(|&p| {
                    let data_for = &data_for;
                    s.spawn(move || self.send_to(p, data_for(p)))
                })
                .collect();
            let got: Result<Vec<Vec<f32>>, CommError> = others.iter().map(|&p| recv(p)).collect();
            for (sender, &p) in senders.into_iter().zip(others) {
                sender.join().unwrap_or_else(|_| Err(CommError::Io { peer: p, message: "sender thread panicked".into() }))?;
            }
            got
        })
    }

    fn others(&self) -> Vec<usize> {
        (0..self.world).filter(|&r| r != self.rank).collect()
    }

    /// Puts this rank's own part into the rank-ordered list of received parts.
    fn with_mine(&self, received: Vec<Vec<f32>>, mine: Vec<f32>) -> Vec<Vec<f32>> {
        let mut parts = received;
        parts.insert(self.rank, mine);
        parts
    }

    /// Every rank sends its whole buffer to every other; each adds them in the same tree.
    fn all_reduce_direct(&self, buf: &mut [f32]) -> Result<(), CommError> {
        let mine = buf.to_vec();
        let received = self.send_all_recv_all(&self.others(), |_| &mine, |p| self.recv_exact(p, mine.len(), "all_reduce"))?;
        let mut parts = self.with_mine(received, mine.clone());
        crate::tree_sum(&mut parts);
        buf.copy_from_slice(&parts[0]);
        Ok(())
    }

    /// Reduce-scatter (rank r adds up everyone's chunk r, in the same tree as the direct
    /// algorithm) then all-gather: each rank sends and receives `2 (w-1)/w` of the buffer,
    /// the bandwidth of a ring, in two rounds instead of `2 (w-1)`.
    fn all_reduce_split(&self, buf: &mut [f32]) -> Result<(), CommError> {
        let (w, len) = (self.world, buf.len());
        let chunk = |i: usize| -> Range<usize> { (i * len / w)..((i + 1) * len / w) };
        let others = self.others();
        let mine = chunk(self.rank);
        let received = {
            let data: &[f32] = buf;
            self.send_all_recv_all(&others, |p| &data[chunk(p)], |p| self.recv_exact(p, mine.len(), "all_reduce"))?
        };
        let mut parts = self.with_mine(received, buf[mine.clone()].to_vec());
        crate::tree_sum(&mut parts);
        let reduced = std::mem::take(&mut parts[0]);
        let gathered = self.send_all_recv_all(&others, |_| &reduced, |p| self.recv_exact(p, chunk(p).len(), "all_reduce"))?;
        for (&p, got) in others.iter().zip(gathered) {
            buf[chunk(p)].copy_from_slice(&got);
        }
        buf[mine].copy_from_slice(&reduced);
        Ok(())
    }
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        if self.world == 1 || buf.is_empty() {
            return Ok(());
        }
        if 4 * buf.len() >= self.split_threshold && buf.len() >= self.world {
            self.all_reduce_split(buf)
        } else {
            self.all_reduce_direct(buf)
        }
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
        let others = self.others();
        let mut parts = self.send_all_recv_all(&others, |_| local, |p| self.recv_from(p))?.into_iter();
        let mut out = Vec::new();
        for r in 0..self.world {
            if r == self.rank {
                out.extend_from_slice(local);
            } else {
                out.extend(parts.next().expect("one frame per peer"));
            }
        }
        Ok(out)
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        if root >= self.world {
            return Err(CommError::BadRank { rank: root, world: self.world });
        }
        if self.rank == root {
            (0..self.world).filter(|&r| r != root).try_for_each(|p| self.send_to(p, buf))
        } else {
            let got = self.recv_exact(root, buf.len(), "broadcast")?;
            buf.copy_from_slice(&got);
            Ok(())
        }
    }

    fn send(&self, buf: &[f32], peer: usize) -> Result<(), CommError> {
        self.send_to(peer, buf)
    }

    fn recv(&self, buf: &mut [f32], peer: usize) -> Result<(), CommError> {
        let got = self.recv_exact(peer, buf.len(), "recv")?;
        buf.copy_from_slice(&got);
        Ok(())
    }

    fn barrier(&self) -> Result<(), CommError> {
        let mut one = [1.0f32];
        self.all_reduce_direct(&mut one)
    }
}

/// Bytes of a hello: the sender's rank, the session, and the proof.
const HELLO_LEN: usize = 8 + 8 + 32;

/// How long an accepted connection has to send its whole hello. Peers send theirs right
/// after connecting; anything slower is not a peer.
pub const HELLO_WAIT: Duration = Duration::from_secs(5);

/// Domain tag of the hello's MAC, so it can never be confused with another use of the key.
const HELLO_TAG: &[u8] = b"tpserve collective hello v1";

/// The hello rank `from` sends rank `to` in `session`: `from` and `session` (little-endian
/// u64s), then HMAC-SHA256 under the cluster secret `key` over the tag, the session and both
/// ranks. It proves the sender holds the secret without sending it, and a hello captured
/// for one pair or session is worth nothing for another.
pub fn hello(key: &[u8], session: u64, from: usize, to: usize) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[..8].copy_from_slice(&(from as u64).to_le_bytes());
    h[8..16].copy_from_slice(&session.to_le_bytes());
    h[16..].copy_from_slice(&hello_mac(key, session, from as u64, to as u64).finalize().into_bytes());
    h
}

fn hello_mac(key: &[u8], session: u64, from: u64, to: u64) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(HELLO_TAG);
    mac.update(&session.to_le_bytes());
    mac.update(&from.to_le_bytes());
    mac.update(&to.to_le_bytes());
    mac
}

/// The sending rank of hello `h` received by rank `me` of `world` in `session`, if it is
/// one: the session matches, the rank is in the world, and the MAC verifies (in constant
/// time). Any bytes at all may come in; nothing here allocates or panics.
pub fn check_hello(h: &[u8], key: &[u8], session: u64, me: usize, world: usize) -> Option<usize> {
    if h.len() != HELLO_LEN || h[8..16] != session.to_le_bytes() {
        return None;
    }
    let from = u64::from_le_bytes(h[..8].try_into().ok()?);
    if from >= world as u64 {
        return None;
    }
    hello_mac(key, session, from, me as u64).verify_slice(&h[16..]).ok()?;
    Some(from as usize)
}

/// An accepted connection whose hello is still coming.
struct Pending {
    s: TcpStream,
    from: SocketAddr,
    got: Vec<u8>,
    since: Instant,
}

enum Poll {
    Waiting,
    Closed,
    Hello(Vec<u8>),
}

impl Pending {
    /// Reads what has arrived of the hello, without blocking.
    fn poll(&mut self) -> Poll {
        let mut buf = [0u8; HELLO_LEN];
        let want = HELLO_LEN - self.got.len();
        match self.s.read(&mut buf[..want]) {
            Ok(0) => Poll::Closed,
            Ok(n) => {
                self.got.extend_from_slice(&buf[..n]);
                if self.got.len() == HELLO_LEN {
                    Poll::Hello(std::mem::take(&mut self.got))
                } else {
                    Poll::Waiting
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Poll::Waiting,
            Err(_) => Poll::Closed,
        }
    }
}

/// Says on stderr that a connection to the collective's port was refused (this crate does
/// not depend on a logging framework; a refusal is rare and worth seeing).
fn warn_refused(from: &SocketAddr, why: &str) {
    eprintln!("warning: collective connection from {from} refused: it {why}");
}

fn setup(s: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))
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

fn io_err(peer: usize, e: std::io::Error) -> CommError {
    CommError::Io { peer, message: e.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on every rank of a fresh loopback world of `world` ranks, one thread each.
    fn with_world<T: Send>(world: usize, split_threshold: usize, f: impl Fn(&TcpCollective) -> T + Sync) -> Vec<T> {
        let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, l)| {
                    let (addrs, f) = (&addrs, &f);
                    s.spawn(move || {
                        let c = TcpCollective::connect(rank, &l, addrs, Duration::from_secs(10)).unwrap().with_split_threshold(split_threshold);
                        f(&c)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Small integers, so every summation order gives the same exact floats.
    fn data(rank: usize, n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7 + rank * 13) % 23) as f32 - 11.0).collect()
    }

    #[test]
    fn all_reduce_equals_the_reference_sum_for_world_sizes_one_to_four_and_awkward_lengths() {
        for world in 1..=4 {
            for n in [1, 2, 3, 5, 1000, 65_537, 1_000_003] {
                // Both algorithms: direct (threshold above the size) and split (threshold 0).
                for threshold in [usize::MAX, 0] {
                    let parts: Vec<Vec<f32>> = (0..world).map(|r| data(r, n)).collect();
                    let want: Vec<f32> = (0..n).map(|i| parts.iter().map(|p| p[i]).sum()).collect();
                    let got = with_world(world, threshold, |c| {
                        let mut buf = data(c.rank(), n);
                        c.all_reduce_sum(&mut buf).unwrap();
                        buf
                    });
                    for (rank, g) in got.iter().enumerate() {
                        assert!(g == &want, "world {world}, n {n}, threshold {threshold}: rank {rank} differs");
                    }
                }
            }
        }
    }

    #[test]
    fn all_gather_broadcast_send_recv_and_barrier_move_the_right_values() {
        for world in 2..=4 {
            let got = with_world(world, DEFAULT_SPLIT_THRESHOLD, |c| {
                let r = c.rank();
                // Uneven slices, as vocabulary shards are.
                let gathered = c.all_gather(&data(r, 3 + r)).unwrap();
                let mut b = if r == 1 { vec![4.0, 5.0, 6.0] } else { vec![0.0; 3] };
                c.broadcast(&mut b, 1).unwrap();
                // A pipeline hand-off from each rank to the next.
                let mut from_prev = vec![0.0; 2];
                if r + 1 < c.world_size() {
                    c.send(&[r as f32, 10.0 * r as f32], r + 1).unwrap();
                }
                if r > 0 {
                    c.recv(&mut from_prev, r - 1).unwrap();
                }
                c.barrier().unwrap();
                (gathered, b, from_prev)
            });
            let want_gather: Vec<f32> = (0..world).flat_map(|r| data(r, 3 + r)).collect();
            for (r, (g, b, p)) in got.into_iter().enumerate() {
                assert_eq!(g, want_gather);
                assert_eq!(b, [4.0, 5.0, 6.0]);
                if r > 0 {
                    assert_eq!(p, [(r - 1) as f32, 10.0 * (r - 1) as f32]);
                }
            }
        }
    }

    #[test]
    fn tensor_and_pipeline_subgroups_share_one_world_and_run_at_once() {
        // World 4 = 2 stages x tp 2: tp groups {0,1} and {2,3}, pipeline groups {0,2} and {1,3}.
        let got = with_world(4, DEFAULT_SPLIT_THRESHOLD, |c| {
            let r = c.rank();
            let (stage, t) = (r / 2, r % 2);
            let tp = c.subgroup(&[2 * stage, 2 * stage + 1]).unwrap();
            let pp = c.subgroup(&[t, 2 + t]).unwrap();
            assert_eq!((tp.rank(), tp.world_size(), pp.rank(), pp.world_size()), (t, 2, stage, 2));
            let mut sum = vec![r as f32; 1000];
            tp.all_reduce_sum(&mut sum).unwrap();
            let mut handed = vec![0.0; 3];
            if stage == 0 {
                pp.send(&[sum[0], 7.0, t as f32], 1).unwrap();
            } else {
                pp.recv(&mut handed, 0).unwrap();
            }
            (sum[0], handed)
        });
        assert_eq!(got[0], (1.0, vec![0.0; 3]));
        assert_eq!(got[1].0, 1.0);
        assert_eq!(got[2], (5.0, vec![1.0, 7.0, 0.0]));
        assert_eq!(got[3], (5.0, vec![1.0, 7.0, 1.0]));
        let solo = with_world(2, DEFAULT_SPLIT_THRESHOLD, |c| c.subgroup(&[1 - c.rank()]).err().map(|e| e.to_string()));
        assert!(solo.iter().all(|e| e.is_some()), "a subgroup without this rank must be refused");
    }

    #[test]
    fn a_length_mismatch_between_ranks_is_an_error_naming_both_lengths() {
        let got = with_world(2, usize::MAX, |c| {
            let mut buf = vec![1.0; 4 + c.rank()];
            c.all_reduce_sum(&mut buf)
        });
        assert!(got.iter().any(|r| matches!(r, Err(CommError::LengthMismatch { .. }))), "{got:?}");
    }

    #[test]
    fn a_dead_or_silent_peer_is_an_error_within_the_deadline_not_a_hang() {
        let listeners: Vec<TcpListener> = (0..3).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let timeout = Duration::from_millis(500);
        let results = std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, l)| {
                    let addrs = &addrs;
                    s.spawn(move || {
                        let c = TcpCollective::connect(rank, &l, addrs, timeout).unwrap();
                        match rank {
                            // Rank 2 dies at once (its sockets close); rank 1 stays but never
                            // joins the collective.
                            2 => None,
                            1 => {
                                std::thread::sleep(timeout * 4);
                                None
                            }
                            _ => {
                                let start = Instant::now();
                                let mut buf = vec![1.0; 8];
                                Some((c.all_reduce_sum(&mut buf), start.elapsed()))
                            }
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
        });
        let (res, _elapsed) = results[0].as_ref().unwrap();
        assert!(res.is_err(), "rank 0's all-reduce with a dead and a silent peer succeeded");
    }

    #[test]
    fn a_leftover_connection_of_an_earlier_session_is_ignored() {
        let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let addrs = [l0.local_addr().unwrap(), l1.local_addr().unwrap()];
        // An earlier attempt's rank 1 said hello with session 1, then went away.
        let mut stale = TcpStream::connect(addrs[0]).unwrap();
        stale.write_all(&hello(KEY, 1, 1, 0)).unwrap();
        drop(stale);
        assert_eq!(two_ranks(&l0, &l1, &addrs, KEY, KEY, Duration::from_secs(5)).unwrap(), (3.0, 3.0));
    }

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    /// Connects ranks 0 and 1 (keys `k0`, `k1`) in session 2 and all-reduces 1 + 2.
    fn two_ranks(l0: &TcpListener, l1: &TcpListener, addrs: &[SocketAddr], k0: &[u8], k1: &[u8], t: Duration) -> Result<(f32, f32), CommError> {
        std::thread::scope(|s| {
            let h = s.spawn(|| TcpCollective::connect_within(1, l1, addrs, 2, k1, t, t));
            let c0 = TcpCollective::connect_within(0, l0, addrs, 2, k0, t, t);
            let c1 = h.join().unwrap();
            let (c0, c1) = (c0?, c1?);
            let h = s.spawn(move || {
                let mut b = vec![2.0f32];
                c1.all_reduce_sum(&mut b).map(|()| b[0])
            });
            let mut b = vec![1.0f32];
            c0.all_reduce_sum(&mut b)?;
            Ok((b[0], h.join().unwrap()?))
        })
    }

    #[test]
    fn idle_garbage_and_wrongly_keyed_connections_neither_stall_a_load_nor_get_in() {
        let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let addrs = [l0.local_addr().unwrap(), l1.local_addr().unwrap()];
        // Three idle connections, random bytes, a huge "length", and a hello of rank 1 made
        // with another key, all waiting in rank 0's backlog before the real peer comes.
        let mut junk: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addrs[0]).unwrap()).collect();
        let mut g = TcpStream::connect(addrs[0]).unwrap();
        g.write_all(&[0xAB; 100]).unwrap();
        junk.push(g);
        let mut huge = TcpStream::connect(addrs[0]).unwrap();
        huge.write_all(&u64::MAX.to_le_bytes()).unwrap();
        junk.push(huge);
        let mut forged = TcpStream::connect(addrs[0]).unwrap();
        forged.write_all(&hello(b"not the cluster's secret at all!", 2, 1, 0)).unwrap();
        junk.push(forged);
        let t = std::time::Instant::now();
        assert_eq!(two_ranks(&l0, &l1, &addrs, KEY, KEY, Duration::from_secs(20)).unwrap(), (3.0, 3.0));
        // The idle ones cost nothing: they are read at once with the real peer (generous bound).
        assert!(t.elapsed() < HELLO_WAIT, "connecting took {:?} with idle connections in the backlog", t.elapsed());
        drop(junk);
    }

    #[test]
    fn a_rank_without_the_secret_never_joins_the_world() {
        let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let addrs = [l0.local_addr().unwrap(), l1.local_addr().unwrap()];
        match two_ranks(&l0, &l1, &addrs, KEY, b"a stranger's key", Duration::from_secs(2)) {
            Err(CommError::Timeout { peer: 1, .. }) => {}
            other => panic!("rank 0 must time out waiting for a rank 1 that proves the key, got {other:?}"),
        }
    }

    #[test]
    fn hellos_verify_only_for_their_key_session_and_pair_and_any_bytes_are_refused() {
        let h = hello(KEY, 7, 1, 0);
        assert_eq!(check_hello(&h, KEY, 7, 0, 2), Some(1));
        assert_eq!(check_hello(&h, b"other", 7, 0, 2), None);
        assert_eq!(check_hello(&h, KEY, 8, 0, 2), None);
        // Replayed to another rank, or claiming a rank outside the world.
        assert_eq!(check_hello(&h, KEY, 7, 2, 3), None);
        assert_eq!(check_hello(&hello(KEY, 7, 5, 0), KEY, 7, 0, 2), None);
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng as u8
                })
                .collect();
            assert_eq!(check_hello(&bytes, KEY, 7, 0, 2), None);
        }
    }

    #[test]
    fn connecting_to_a_rank_that_never_comes_is_a_timeout() {
        let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
        // Rank 1's address is bound but nobody connects from it.
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let addrs = [l0.local_addr().unwrap(), l1.local_addr().unwrap()];
        let err = TcpCollective::connect(0, &l0, &addrs, Duration::from_millis(200)).err().expect("no rank 1");
        assert!(matches!(err, CommError::Timeout { peer: 1, .. }), "{err}");
    }

    /// The all-reduce crossover: `cargo test -p tpserve-comm --release -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn measure_direct_vs_split_all_reduce() {
        for world in [2, 4] {
            for n in [16usize, 1024, 16 * 1024, 64 * 1024, 256 * 1024, 1024 * 1024] {
                let mut line = format!("world {world} {:>8} B:", 4 * n);
                for (name, threshold) in [("direct", usize::MAX), ("split", 0)] {
                    let times = with_world(world, threshold, |c| {
                        let mut buf = vec![1.0f32; n];
                        c.barrier().unwrap();
                        let start = Instant::now();
                        for _ in 0..20 {
                            c.all_reduce_sum(&mut buf).unwrap();
                        }
                        start.elapsed() / 20
                    });
                    line += &format!("  {name} {:>9.1?}", times.iter().max().unwrap());
                }
                println!("{line}");
            }
        }
    }
}
