//! The TCP collective: persistent connections between every pair of ranks (TCP_NODELAY,
//! length-prefixed frames of little-endian f32), with a deadline on every wait so a dead or
//! partitioned peer becomes an error on every rank instead of a hang. Connections open with
//! an authenticated hello (see [`TcpCollective::connect_within`] and [`crate::wire`]); every
//! frame's length is checked before its body is allocated.
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

use crate::handshake::{self, io_err};
use crate::wire::{self, FrameError, FRAME_HEADER_LEN};
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

/// A frame whose length no operation fixes (an all-gather's uneven slices) is read in pieces
/// of this many bytes, so its buffer grows with the bytes that came, not with the header.
const RECV_PIECE_BYTES: usize = 1 << 20;

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
    /// address is `addrs[rank]`); lower ranks accept, higher ranks connect. Session 0 and no
    /// key (loopback worlds, tests); every step is bounded by `timeout`.
    pub fn connect(rank: usize, listener: &TcpListener, addrs: &[SocketAddr], timeout: Duration) -> Result<Self, CommError> {
        Self::connect_within(rank, listener, addrs, 0, &[], timeout, timeout)
    }

    /// [`connect`](Self::connect) for one load: waits up to `connect_within` for every peer
    /// to come (peers may start late), with `timeout` on every later wait.
    ///
    /// Each connection opens with a challenge-response hello ([`crate::wire`]): the accepting
    /// (lower) rank sends a fresh nonce, the connecting rank answers with its rank, `session`
    /// and an HMAC-SHA256 under `key` (the cluster token's bytes; empty when none is
    /// configured) over the session, both ranks and the nonce, and the acceptor proves the
    /// key back. The key never crosses the wire, and a captured hello is refused everywhere.
    /// A connection with another session (a leftover of an earlier, failed attempt), a wrong
    /// MAC, or garbage is logged and dropped, not mistaken for a peer; each accepted
    /// connection is checked on its own thread with a short deadline, so idle connections on
    /// the port do not delay the load. A peer that proves the wrong key makes this rank fail
    /// with [`CommError::Refused`] naming it.
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
        let opening = handshake::Opening { rank, world, session, key, deadline: Instant::now() + connect_within, connect_within };
        // Connect to every lower rank (each accepts only higher ranks, so nobody waits in a
        // cycle), then accept every higher one.
        let mut lower = Vec::with_capacity(rank);
        for (peer, addr) in addrs.iter().enumerate().take(rank) {
            lower.push(Some(handshake::connect_peer(&opening, peer, addr)?));
        }
        let mut streams = handshake::accept_peers(&opening, listener)?;
        for (peer, s) in lower.into_iter().enumerate() {
            streams[peer] = s;
        }
        for (peer, s) in streams.iter().enumerate() {
            if let Some(s) = s {
                setup(s, timeout).map_err(|e| io_err(peer, e))?;
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
        bytes.extend_from_slice(&wire::frame_header(buf.len()));
        for v in buf {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        w.write_all(&bytes).map_err(|e| self.wait_err(peer, e))
    }

    /// Receives one frame from `peer` (of any length), for an all-gather: the header is
    /// checked before anything is allocated, and the body is read in pieces so a lying
    /// header costs only the bytes that really came.
    fn recv_from(&self, peer: usize) -> Result<Vec<f32>, CommError> {
        self.recv_frame(peer, None, "all_gather")
    }

    /// Receives one frame of exactly `n` values; a frame of another length is an error
    /// naming both, found from its header before its body is allocated.
    fn recv_exact(&self, peer: usize, n: usize, op: &'static str) -> Result<Vec<f32>, CommError> {
        self.recv_frame(peer, Some(n), op)
    }

    fn recv_frame(&self, peer: usize, expected: Option<usize>, op: &'static str) -> Result<Vec<f32>, CommError> {
        let p = self.peer(peer)?;
        let mut r = p.reader.lock().map_err(|_| CommError::Io { peer, message: "connection poisoned".into() })?;
        self.poll_readable(&r);
        let mut header = [0u8; FRAME_HEADER_LEN];
        r.read_exact(&mut header).map_err(|e| self.wait_err(peer, e))?;
        let n = match wire::frame_len(header, expected) {
            Ok(n) => n,
            Err(FrameError::Mismatch { expected, got }) => {
                // Skip the body without storing it, so the pair's next frame still lines up;
                // the error is the mismatch whatever the skip meets.
                let _ = std::io::copy(&mut (&mut *r).take(4 * got as u64), &mut std::io::sink());
                return Err(CommError::LengthMismatch { op, local: expected, peer: self.world_rank(peer), remote: got });
            }
            Err(e) => return Err(CommError::Io { peer: self.world_rank(peer), message: e.to_string() }),
        };
        if expected.is_some() {
            // The operation holds a buffer of this length already: the header asks for no more.
            let mut bytes = vec![0u8; 4 * n];
            r.read_exact(&mut bytes).map_err(|e| self.wait_err(peer, e))?;
            let mut out = Vec::with_capacity(n);
            wire::extend_f32s(&mut out, &bytes);
            return Ok(out);
        }
        let mut out = Vec::new();
        let mut piece = vec![0u8; RECV_PIECE_BYTES.min(4 * n)];
        let mut left = 4 * n;
        while left > 0 {
            let take = left.min(piece.len());
            r.read_exact(&mut piece[..take]).map_err(|e| self.wait_err(peer, e))?;
            wire::extend_f32s(&mut out, &piece[..take]);
            left -= take;
        }
        Ok(out)
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

fn setup(s: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))
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
        // An earlier attempt's rank 1 connected, then went away unanswered.
        drop(TcpStream::connect(addrs[0]).unwrap());
        let t = Duration::from_secs(5);
        let sum = std::thread::scope(|s| {
            let h0 = s.spawn(|| TcpCollective::connect_within(0, &l0, &addrs, 2, &[], t, t).unwrap());
            // Another, still alive, answers rank 0's challenge for session 1 before the real
            // rank 1 comes (so rank 0 cannot be done before it has judged it).
            let mut stale = TcpStream::connect(addrs[0]).unwrap();
            stale.set_read_timeout(Some(t)).unwrap();
            let mut challenge = [0u8; wire::CHALLENGE_LEN];
            stale.read_exact(&mut challenge).unwrap();
            let nonce = wire::parse_challenge(&challenge).unwrap();
            stale.write_all(&wire::hello(&[], 1, 1, 0, &nonce, &[3; wire::NONCE_LEN])).unwrap();
            let mut verdict = [0u8; wire::VERDICT_LEN];
            stale.read_exact(&mut verdict).unwrap();
            assert_eq!(verdict[0], 2, "the stale hello was not refused as another session's");
            let c1 = TcpCollective::connect_within(1, &l1, &addrs, 2, &[], t, t).unwrap();
            let c0 = h0.join().unwrap();
            let h = s.spawn(move || {
                let mut b = vec![2.0f32];
                c1.all_reduce_sum(&mut b).unwrap();
                b[0]
            });
            let mut b = vec![1.0f32];
            c0.all_reduce_sum(&mut b).unwrap();
            (b[0], h.join().unwrap())
        });
        assert_eq!(sum, (3.0, 3.0));
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
