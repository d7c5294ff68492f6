//! Collectives between the tensor-parallel ranks of one pipeline stage, and point-to-point
//! transfers between stages.
//!
//! The model code only sees the [`Collective`] trait, so the same layer types run on one
//! process ([`Local`], world size 1), over TCP between CPUs ([`TcpCollective`]), or over NCCL
//! between GPUs (`nccl::Nccl`, feature `nccl`). GPU ranks also reach the device-memory calls
//! of [`DeviceCollective`] through [`Collective::device`], so activations need not cross to
//! the host. [`wire`] holds the TCP collective's bytes (the authenticated hello, the frame
//! header) as pure functions, for tests and the fuzzer; [`watchdog`] holds the bounded wait
//! every NCCL call goes through, as pure logic tested on the CPU.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod handshake;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod tcp;
pub mod watchdog;
pub mod wire;

pub use tcp::TcpCollective;

/// Bytes in an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`): rank 0 makes one (`nccl::unique_id`)
/// and the control plane carries it to every rank as plain bytes, so it is defined here, with
/// or without the `nccl` feature.
pub const NCCL_ID_BYTES: usize = 128;

/// Why a collective failed. Every wait has a deadline, so a dead peer becomes an error.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// A peer sent nothing (or accepted nothing) before the deadline: it died, hangs, or is
    /// partitioned away; or, while connecting, it never came up.
    #[error("rank {peer} did not answer within {timeout:?}")]
    Timeout {
        /// World rank of the silent peer.
        peer: usize,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// A rank argument (a root, a peer, a subgroup member) is not in the group: a bug in the
    /// caller's plan, not a network problem.
    #[error("rank {rank} is out of range for world size {world}")]
    BadRank {
        /// The rank asked for.
        rank: usize,
        /// The size of the group it was asked of.
        world: usize,
    },
    /// A socket error other than a timeout (connection refused or reset, a peer that
    /// closed), or a corrupt frame or handshake.
    #[error("connection to rank {peer} failed: {message}")]
    Io {
        /// World rank at the other end of the connection (this rank's own when its
        /// listener failed).
        peer: usize,
        /// What went wrong, from the OS or the framing.
        message: String,
    },
    /// A hello failed its proof: the peer (or whatever answered at its address) holds
    /// another cluster token, or the ranks disagree about the world. Retrying cannot help;
    /// give every rank the same `--cluster-token`.
    #[error("rank {peer} was refused: {reason}")]
    Refused {
        /// World rank that did not prove itself (or that refused this rank's proof).
        peer: usize,
        /// What the hello showed.
        reason: String,
    },
    /// Two ranks called the same collective with different buffer lengths: the ranks
    /// disagree about the step (a bug), and the result would be garbage.
    #[error("length mismatch in {op}: this rank has {local} elements, rank {peer} has {remote}")]
    LengthMismatch {
        /// The collective ("all_reduce", "broadcast", "recv").
        op: &'static str,
        /// Elements this rank expected.
        local: usize,
        /// World rank of the peer whose frame differed.
        peer: usize,
        /// Elements the peer sent.
        remote: usize,
    },
    /// NCCL, or the CUDA stream it runs on, reported an error: a peer's process died or its
    /// connection broke, a CUDA fault, a bad argument. The message names the NCCL or CUDA
    /// error and what to check. An error NCCL or the stream reports during a call aborts the
    /// communicator: every later call on it fails at once with this variant (saying so), and
    /// only a reload (a new communicator) recovers. A failed copy or allocation around a call
    /// is this variant too, without the abort.
    #[error("NCCL {op} on rank {rank} failed: {message}")]
    Device {
        /// This process's rank in the NCCL group.
        rank: usize,
        /// What was running ("all_reduce", "send to rank 1", "init", ...).
        op: String,
        /// The NCCL or CUDA error, and what to do about it.
        message: String,
    },
    /// A GPU collective did not finish before its deadline (NCCL cannot say which peer is
    /// missing): a peer died, hangs, or is partitioned away, or never joined. The watchdog
    /// aborted the communicator, as the TCP collective drops a silent peer; every later call
    /// on it fails at once, and a reload makes a new one.
    #[error("NCCL {op} on rank {rank} did not finish within {timeout:?}: a peer died, hangs, or is partitioned away; the communicator was aborted (reload to make a new one)")]
    DeviceTimeout {
        /// This process's rank in the NCCL group.
        rank: usize,
        /// What was running ("all_reduce", "recv from rank 0", "init", ...).
        op: String,
        /// The deadline that passed.
        timeout: Duration,
    },
}

/// Collectives on device memory (GPU ranks): buffers are CUDA device addresses on the stream
/// the collective was made with, so activations stay on the GPU.
///
/// The same rules as [`Collective`] hold: all ranks call the same operations in the same
/// order with the same lengths. The caller keeps each buffer (`len` f32 on the collective's
/// device) alive and unused elsewhere until the call returns, and enqueues the kernels that
/// write it on the collective's stream (the model's), which orders them before the call. A
/// wrong address cannot touch host memory, but it can corrupt device memory or fault the GPU
/// context, after which every call fails.
pub trait DeviceCollective: Send + Sync {
    /// Element-wise sum of the `len` f32 values at device address `buf` over all ranks,
    /// written back in place on every rank.
    fn all_reduce_sum_device(&self, buf: u64, len: usize) -> Result<(), CommError>;
    /// Sends the `len` f32 values at device address `buf` to `peer`.
    fn send_device(&self, buf: u64, len: usize, peer: usize) -> Result<(), CommError>;
    /// Receives exactly `len` f32 values from `peer` into device address `buf`.
    fn recv_device(&self, buf: u64, len: usize, peer: usize) -> Result<(), CommError>;
}

/// A group of ranks that compute together. All ranks must call the same collectives in the
/// same order with the same lengths.
pub trait Collective: Send + Sync {
    /// This process's rank in `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks in the group; 1 makes every collective the identity.
    fn world_size(&self) -> usize;
    /// Element-wise sum of `buf` over all ranks, written back into every rank's `buf`.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError>;
    /// Concatenation of every rank's `local` in rank order.
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError>;
    /// `buf` on `root` is copied to every other rank's `buf`.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError>;
    /// Sends `buf` to `peer` (pipeline stage hand-off).
    fn send(&self, buf: &[f32], peer: usize) -> Result<(), CommError>;
    /// Receives exactly `buf.len()` values from `peer`.
    fn recv(&self, buf: &mut [f32], peer: usize) -> Result<(), CommError>;
    /// Returns once every rank has entered the barrier.
    fn barrier(&self) -> Result<(), CommError>;
    /// The device-memory calls of this group, where its ranks are GPUs (NCCL); `None` for
    /// host-only collectives (Local, TCP), whose callers copy to host slices instead.
    fn device(&self) -> Option<&dyn DeviceCollective> {
        None
    }
}

/// Sums `parts` into `parts[0]` as a balanced binary tree ((p0 + p1) + (p2 + p3) for four).
///
/// The all-reduce adds ranks' buffers in this shape, and the model's row-parallel layers add
/// their partial products in it too, so a sum of 4 parts comes out bit-identical whether one
/// rank holds all 4, two ranks hold 2 each, or four ranks hold 1 each.
pub fn tree_sum(parts: &mut [Vec<f32>]) {
    let n = parts.len();
    if n <= 1 {
        return;
    }
    let (left, right) = parts.split_at_mut(n.div_ceil(2));
    tree_sum(left);
    tree_sum(right);
    for (a, b) in left[0].iter_mut().zip(&right[0]) {
        *a += b;
    }
}

/// A collective that counts the time its calls take, so a step can report how much of it
/// was communication (waiting for peers included). Device calls count too: where the inner
/// collective has a [`DeviceCollective`], [`Timed::device`](Collective::device) returns the
/// `Timed` itself, which times each call to the inner one.
pub struct Timed {
    inner: Arc<dyn Collective>,
    nanos: AtomicU64,
}

impl Timed {
    /// Wraps `inner`, starting the clock at zero.
    pub fn new(inner: Arc<dyn Collective>) -> Self {
        Self { inner, nanos: AtomicU64::new(0) }
    }

    /// Time spent in collective calls so far.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }

    fn time<T>(&self, f: impl FnOnce(&dyn Collective) -> T) -> T {
        let t = Instant::now();
        let out = f(self.inner.as_ref());
        self.nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }

    /// Times `f` on the inner collective's device calls; an error if it has none (a caller
    /// that used this `Timed` as a [`DeviceCollective`] without asking [`Collective::device`]).
    fn time_device(&self, op: &str, f: impl FnOnce(&dyn DeviceCollective) -> Result<(), CommError>) -> Result<(), CommError> {
        self.time(|c| match c.device() {
            Some(d) => f(d),
            None => Err(CommError::Device {
                rank: c.rank(),
                op: op.to_string(),
                message: "this group has no device path (a Local or TCP collective): copy to host and use the slice calls".into(),
            }),
        })
    }
}

impl DeviceCollective for Timed {
    fn all_reduce_sum_device(&self, buf: u64, len: usize) -> Result<(), CommError> {
        if self.inner.world_size() == 1 {
            return Ok(());
        }
        self.time_device("all_reduce", |d| d.all_reduce_sum_device(buf, len))
    }
    fn send_device(&self, buf: u64, len: usize, peer: usize) -> Result<(), CommError> {
        self.time_device("send", |d| d.send_device(buf, len, peer))
    }
    fn recv_device(&self, buf: u64, len: usize, peer: usize) -> Result<(), CommError> {
        self.time_device("recv", |d| d.recv_device(buf, len, peer))
    }
}

impl Collective for Timed {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        if self.inner.world_size() == 1 {
            return Ok(());
        }
        self.time(|c| c.all_reduce_sum(buf))
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
        self.time(|c| c.all_gather(local))
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        self.time(|c| c.broadcast(buf, root))
    }
    fn send(&self, buf: &[f32], peer: usize) -> Result<(), CommError> {
        self.time(|c| c.send(buf, peer))
    }
    fn recv(&self, buf: &mut [f32], peer: usize) -> Result<(), CommError> {
        self.time(|c| c.recv(buf, peer))
    }
    fn barrier(&self) -> Result<(), CommError> {
        self.time(|c| c.barrier())
    }
    fn device(&self) -> Option<&dyn DeviceCollective> {
        self.inner.device().map(|_| self as &dyn DeviceCollective)
    }
}

/// The collective of a world of one: every operation is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Local;

impl Collective for Local {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<(), CommError> {
        Ok(())
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
        Ok(local.to_vec())
    }
    fn broadcast(&self, _buf: &mut [f32], root: usize) -> Result<(), CommError> {
        if root != 0 {
            return Err(CommError::BadRank { rank: root, world: 1 });
        }
        Ok(())
    }
    fn send(&self, _buf: &[f32], peer: usize) -> Result<(), CommError> {
        Err(CommError::BadRank { rank: peer, world: 1 })
    }
    fn recv(&self, _buf: &mut [f32], peer: usize) -> Result<(), CommError> {
        Err(CommError::BadRank { rank: peer, world: 1 })
    }
    fn barrier(&self) -> Result<(), CommError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_sum_composes_over_halves() {
        let parts: Vec<Vec<f32>> = (0..4).map(|i| vec![0.1 * (i as f32 + 1.0), 1e8, -1e8 + i as f32]).collect();
        let mut all = parts.clone();
        tree_sum(&mut all);
        let mut halves = parts.clone();
        let (a, b) = halves.split_at_mut(2);
        tree_sum(a);
        tree_sum(b);
        let mut ranks = vec![a[0].clone(), b[0].clone()];
        tree_sum(&mut ranks);
        assert_eq!(all[0], ranks[0]);
        assert_eq!(all[0][0].to_bits(), ((0.1f32 + 0.2) + (0.3f32 + 0.4)).to_bits());
    }

    #[test]
    fn local_collectives_are_the_identity() {
        let c = Local;
        let mut v = vec![1.0, 2.0, 3.0];
        c.all_reduce_sum(&mut v).unwrap();
        assert_eq!(v, [1.0, 2.0, 3.0]);
        assert_eq!(c.all_gather(&v).unwrap(), v);
        assert!(c.broadcast(&mut v, 0).is_ok());
        assert!(matches!(c.broadcast(&mut v, 1), Err(CommError::BadRank { rank: 1, world: 1 })));
        assert!(c.send(&v, 1).is_err());
        c.barrier().unwrap();
    }

    #[test]
    fn timed_counts_only_time_spent_in_collective_calls() {
        let t = Timed::new(Arc::new(Gpu { calls: Default::default() }));
        assert_eq!(t.elapsed(), Duration::ZERO);
        t.all_reduce_sum(&mut [1.0]).unwrap();
        t.all_reduce_sum(&mut [1.0]).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(40), "{:?}", t.elapsed());
    }

    /// A two-rank group whose all-reduces (host and device) take 20 ms, with a device path
    /// that counts its all-reduce calls.
    struct Gpu {
        calls: std::sync::atomic::AtomicUsize,
    }

    impl Collective for Gpu {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&self, _: &mut [f32]) -> Result<(), CommError> {
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        }
        fn all_gather(&self, l: &[f32]) -> Result<Vec<f32>, CommError> {
            Ok(l.to_vec())
        }
        fn broadcast(&self, _: &mut [f32], _: usize) -> Result<(), CommError> {
            Ok(())
        }
        fn send(&self, _: &[f32], _: usize) -> Result<(), CommError> {
            Ok(())
        }
        fn recv(&self, _: &mut [f32], _: usize) -> Result<(), CommError> {
            Ok(())
        }
        fn barrier(&self) -> Result<(), CommError> {
            Ok(())
        }
        fn device(&self) -> Option<&dyn DeviceCollective> {
            Some(self)
        }
    }

    impl DeviceCollective for Gpu {
        fn all_reduce_sum_device(&self, buf: u64, len: usize) -> Result<(), CommError> {
            assert_eq!((buf, len), (0xabc0, 7));
            self.calls.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        }
        fn send_device(&self, _: u64, _: usize, peer: usize) -> Result<(), CommError> {
            Err(CommError::BadRank { rank: peer, world: 2 })
        }
        fn recv_device(&self, _: u64, _: usize, _: usize) -> Result<(), CommError> {
            Ok(())
        }
    }

    #[test]
    fn timed_forwards_device_calls_to_the_inner_collective_and_counts_their_time() {
        let gpu = Arc::new(Gpu { calls: Default::default() });
        let t = Timed::new(gpu.clone());
        let d = t.device().expect("the inner collective has a device path");
        d.all_reduce_sum_device(0xabc0, 7).unwrap();
        assert_eq!(gpu.calls.load(Ordering::Relaxed), 1);
        assert!(t.elapsed() >= Duration::from_millis(20), "{:?}", t.elapsed());
        assert!(matches!(d.send_device(0xabc0, 7, 5), Err(CommError::BadRank { rank: 5, world: 2 })));
    }

    #[test]
    fn timed_has_no_device_path_when_the_inner_collective_has_none() {
        let t = Timed::new(Arc::new(Local));
        assert!(t.device().is_none());
        // Used as a DeviceCollective anyway, it says so instead of pretending to succeed.
        let err = DeviceCollective::send_device(&t, 0, 1, 1).unwrap_err();
        assert!(matches!(&err, CommError::Device { op, .. } if op == "send"), "{err}");
        assert!(err.to_string().contains("no device path"), "{err}");
    }
}
