//! The NCCL collective between GPU ranks (feature `nccl`): device-memory calls
//! ([`DeviceCollective`]) for activations that stay on the GPU, and the host-slice calls of
//! [`Collective`] through a device scratch buffer.
//!
//! **Deadlines.** The communicator is made non-blocking (`ncclConfig_t.blocking = 0`), and
//! every call — the init, each operation, the finalize at drop — goes through the
//! [`Watchdog`]: it returns once the operation finished on the stream, or fails when NCCL or
//! CUDA reports an error or when `timeout` passes since the call began. So a dead, hung or
//! partitioned peer becomes [`CommError::DeviceTimeout`] (or [`CommError::Device`] when NCCL
//! notices first) on every rank, never a hang, as with the TCP collective. An operation waits
//! for its matching call on the peers, so `timeout` must cover the skew between ranks (for a
//! pipeline send or receive, a whole stage's compute).
//!
//! **After an abort.** On a failure or a deadline the watchdog aborts the communicator
//! (`ncclCommAbort`: NCCL stops its kernels and frees it). It is unusable from then on: every
//! later call fails at once with [`CommError::Device`] naming what aborted it, and only a
//! reload, which makes a new communicator from a new unique id, recovers.
//!
//! **Ordering.** Every operation is enqueued on the stream given to [`Nccl::new`], which must
//! be the stream the model's kernels run on: the stream orders the kernels that write a
//! buffer before the collective that reads it, with no extra synchronization. Each call then
//! waits for the stream to drain (bounded by the deadline), so when it returns the result is
//! in place and the host may read it; the CPU does not run ahead of the GPU across a
//! collective.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cudarc::driver::{sys as cu, CudaSlice, CudaStream, DevicePtrMut, DriverError};
use cudarc::nccl::{result as nccl_result, sys};

use crate::watchdog::{Pollable, Progress, Until, Watchdog};
use crate::{Collective, CommError, DeviceCollective, NCCL_ID_BYTES};

/// `NCCL_VERSION(2, 30, 0)`: the NCCL release whose `ncclConfig_t` layout cudarc's `nccl`
/// feature (`nccl-02030`) binds. NCCL reads only the fields this version had, so the config
/// works with older and newer libraries alike.
const CONFIG_VERSION: u32 = 2 * 10_000 + 30 * 100;

/// `NCCL_API_MAGIC`: marks a config made by `NCCL_CONFIG_INITIALIZER`.
const CONFIG_MAGIC: u32 = 0xcafe_beef;

/// `NCCL_CONFIG_UNDEF_INT`: "use NCCL's default" for an integer field.
const UNDEF: c_int = c_int::MIN;

/// The smallest scratch buffer, in f32 values, so small calls do not reallocate it.
const MIN_SCRATCH: usize = 1 << 12;

/// Makes a fresh NCCL unique id (`ncclGetUniqueId`), for rank 0 to hand to every rank of
/// one communicator through the control plane. It holds rank 0's bootstrap address: make a
/// new one for every communicator (every load).
pub fn unique_id() -> Result<[u8; NCCL_ID_BYTES], CommError> {
    let id = nccl_result::get_uniqueid().map_err(|e| CommError::Device { rank: 0, op: "unique_id".into(), message: describe(e.0, std::ptr::null_mut()) })?;
    Ok(id.internal.map(|c| c as u8))
}

/// An NCCL communicator handle. Null once aborted or destroyed, so nothing calls NCCL on a
/// freed handle.
struct RawComm(sys::ncclComm_t);

// SAFETY: an `ncclComm_t` is a pointer to a heap object NCCL lets any host thread use, as
// long as calls on one communicator do not overlap; every use goes through the `Mutex` in
// `Nccl`, which serializes them.
unsafe impl Send for RawComm {}

/// What one call on the communicator needs, behind the lock.
struct Inner {
    /// The communicator (null after an abort).
    comm: RawComm,
    /// The deadline of every call, and whether the communicator was aborted.
    watchdog: Watchdog,
    /// Device memory the host-slice calls copy through; grows to the largest call.
    scratch: Option<CudaSlice<f32>>,
    /// One length per rank, for an all-gather of uneven slices.
    lens: Option<CudaSlice<u64>>,
}

/// One rank of an NCCL communicator, on one CUDA stream. See the module docs for the
/// deadline, ordering and abort rules.
pub struct Nccl {
    /// This process's rank in `0..world`.
    rank: usize,
    /// Ranks in the communicator.
    world: usize,
    /// The stream every operation is enqueued on: the model's.
    stream: Arc<CudaStream>,
    /// The deadline of every call (the init's too).
    timeout: Duration,
    /// The communicator and its buffers; the lock serializes calls, as NCCL requires.
    inner: Mutex<Inner>,
}

impl Nccl {
    /// Joins rank `rank` of a `world`-rank communicator made from `id` (the same bytes of
    /// [`unique_id`] on every rank), with every operation on `stream` (the model's stream).
    /// The init (`ncclCommInitRankConfig`, non-blocking) must see every rank join within
    /// `timeout`, as must every later call finish; a rank that never comes makes this a
    /// [`CommError::DeviceTimeout`].
    pub fn new(stream: Arc<CudaStream>, id: &[u8; NCCL_ID_BYTES], rank: usize, world: usize, timeout: Duration) -> Result<Self, CommError> {
        let (Ok(nranks), Ok(myrank)) = (c_int::try_from(world), c_int::try_from(rank)) else {
            return Err(CommError::BadRank { rank, world });
        };
        if rank >= world {
            return Err(CommError::BadRank { rank, world });
        }
        stream.context().bind_to_thread().map_err(|e| cuda_err(rank, "init", e))?;
        let unique = sys::ncclUniqueId { internal: id.map(|b| b as c_char) };
        let mut config = nonblocking_config();
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        let mut watchdog = Watchdog::new(rank, timeout);
        let mut live = Live { comm: &mut comm, stream: &stream };
        watchdog.run(&mut live, "init", Until::Ready, |live| {
            // SAFETY: `live.comm` points to a handle NCCL writes (the new communicator, or
            // null when it fails); `config` is a full `ncclConfig_t` of this binding's layout,
            // alive for the call (NCCL copies it before returning); the id is passed by value.
            let r = unsafe { sys::ncclCommInitRankConfig(&mut *live.comm, nranks, unique, myrank, &mut config) };
            status(r, *live.comm)
        })?;
        let inner = Inner { comm: RawComm(comm), watchdog, scratch: None, lens: None };
        Ok(Self { rank, world, stream, timeout, inner: Mutex::new(inner) })
    }

    /// The stream every operation runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The deadline of every call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Takes the lock for `op`, fails at once if the communicator was aborted, and makes the
    /// stream's CUDA context current on this thread (NCCL and the copies need it).
    fn lock(&self, op: &str) -> Result<MutexGuard<'_, Inner>, CommError> {
        let inner = self.inner.lock().map_err(|_| CommError::Device {
            rank: self.rank,
            op: op.to_string(),
            message: "a thread panicked inside an earlier NCCL call; reload to make a new communicator".into(),
        })?;
        inner.watchdog.check(op)?;
        self.stream.context().bind_to_thread().map_err(|e| cuda_err(self.rank, op, e))?;
        Ok(inner)
    }

    /// Enqueues one NCCL operation on the stream (`enqueue` gets the communicator and the
    /// stream) and waits, through the watchdog, until the stream finished it.
    fn call(&self, inner: &mut Inner, op: &str, enqueue: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> sys::ncclResult_t) -> Result<(), CommError> {
        let stream: sys::cudaStream_t = self.stream.cu_stream().cast();
        let Inner { comm, watchdog, .. } = inner;
        let mut live = Live { comm: &mut comm.0, stream: &self.stream };
        watchdog.run(&mut live, op, Until::StreamDone, |live| {
            let comm = *live.comm;
            status(enqueue(comm, stream), comm)
        })
    }

    /// Waits, through the watchdog, until the stream finished its work (a copy back to the
    /// host).
    fn drain(&self, inner: &mut Inner, op: &str) -> Result<(), CommError> {
        let Inner { comm, watchdog, .. } = inner;
        let mut live = Live { comm: &mut comm.0, stream: &self.stream };
        watchdog.run(&mut live, op, Until::StreamDone, |_| Ok(()))
    }

    /// The device address of a scratch buffer of at least `n` f32 values, copying `src`
    /// (when given) to its start.
    fn stage(&self, inner: &mut Inner, op: &str, n: usize, src: Option<&[f32]>) -> Result<u64, CommError> {
        if inner.scratch.as_ref().is_none_or(|s| s.len() < n) {
            inner.scratch = None;
            let fresh = self.stream.alloc_zeros::<f32>(n.next_power_of_two().max(MIN_SCRATCH)).map_err(|e| cuda_err(self.rank, op, e))?;
            inner.scratch = Some(fresh);
        }
        let scratch = inner.scratch.as_mut().expect("allocated above");
        if let Some(src) = src {
            self.stream.memcpy_htod(src, &mut scratch.slice_mut(..src.len())).map_err(|e| cuda_err(self.rank, op, e))?;
        }
        let (ptr, _record) = scratch.device_ptr_mut(&self.stream);
        Ok(ptr)
    }

    /// Copies the start of the scratch buffer back into `dst` and waits for the copy.
    fn unstage(&self, inner: &mut Inner, op: &str, dst: &mut [f32]) -> Result<(), CommError> {
        let scratch = inner.scratch.as_ref().expect("staged before");
        self.stream.memcpy_dtoh(&scratch.slice(..dst.len()), dst).map_err(|e| cuda_err(self.rank, op, e))?;
        self.drain(inner, op)
    }

    /// Every rank's `n`, in rank order (an all-gather of one u64 per rank).
    fn gather_lengths(&self, inner: &mut Inner, n: usize) -> Result<Vec<usize>, CommError> {
        const OP: &str = "all_gather";
        if inner.lens.is_none() {
            inner.lens = Some(self.stream.alloc_zeros::<u64>(self.world).map_err(|e| cuda_err(self.rank, OP, e))?);
        }
        let lens = inner.lens.as_mut().expect("allocated above");
        self.stream.memcpy_htod(&[n as u64], &mut lens.slice_mut(self.rank..self.rank + 1)).map_err(|e| cuda_err(self.rank, OP, e))?;
        let ptr = lens.device_ptr_mut(&self.stream).0;
        let mine = ptr + (self.rank * std::mem::size_of::<u64>()) as u64;
        self.call(inner, OP, |comm, stream| {
            // SAFETY: `ptr` is the `lens` buffer of `world` u64 on this stream's device, alive
            // (owned by `inner`) until the call returns, which is after the stream finished
            // the op; sending from slot `rank` of the receive buffer is NCCL's in-place form.
            unsafe { sys::ncclAllGather(mine as *const c_void, ptr as *mut c_void, 1, sys::ncclDataType_t::ncclUint64, comm, stream) }
        })?;
        let mut host = vec![0u64; self.world];
        let lens = inner.lens.as_ref().expect("allocated above");
        self.stream.memcpy_dtoh(lens, &mut host).map_err(|e| cuda_err(self.rank, OP, e))?;
        self.drain(inner, OP)?;
        Ok(host.into_iter().map(|l| l as usize).collect())
    }

    /// `peer` as an NCCL rank, or an error if it is out of range or this rank.
    fn peer(&self, peer: usize) -> Result<c_int, CommError> {
        if peer >= self.world || peer == self.rank {
            return Err(CommError::BadRank { rank: peer, world: self.world });
        }
        // `world` fits a c_int (checked in `new`), so `peer` does.
        Ok(peer as c_int)
    }
}

impl DeviceCollective for Nccl {
    fn all_reduce_sum_device(&self, buf: u64, len: usize) -> Result<(), CommError> {
        if self.world == 1 || len == 0 {
            return Ok(());
        }
        let mut inner = self.lock("all_reduce")?;
        self.call(&mut inner, "all_reduce", |comm, stream| {
            // SAFETY: by the trait's contract `buf` holds `len` f32 on this stream's device,
            // alive and not used elsewhere until the call returns, which is after the stream
            // finished the op; the same send and receive buffer is NCCL's in-place form.
            unsafe {
                sys::ncclAllReduce(buf as *const c_void, buf as *mut c_void, len, sys::ncclDataType_t::ncclFloat32, sys::ncclRedOp_t::ncclSum, comm, stream)
            }
        })
    }

    fn send_device(&self, buf: u64, len: usize, peer: usize) -> Result<(), CommError> {
        let to = self.peer(peer)?;
        let op = format!("send to rank {peer}");
        let mut inner = self.lock(&op)?;
        self.call(&mut inner, &op, |comm, stream| {
            // SAFETY: by the trait's contract `buf` holds `len` f32 on this stream's device,
            // alive and unchanged until the call returns, after the stream finished the op.
            unsafe { sys::ncclSend(buf as *const c_void, len, sys::ncclDataType_t::ncclFloat32, to, comm, stream) }
        })
    }

    fn recv_device(&self, buf: u64, len: usize, peer: usize) -> Result<(), CommError> {
        let from = self.peer(peer)?;
        let op = format!("recv from rank {peer}");
        let mut inner = self.lock(&op)?;
        self.call(&mut inner, &op, |comm, stream| {
            // SAFETY: by the trait's contract `buf` has room for `len` f32 on this stream's
            // device, alive and not used elsewhere until the call returns, after the stream
            // finished the op.
            unsafe { sys::ncclRecv(buf as *mut c_void, len, sys::ncclDataType_t::ncclFloat32, from, comm, stream) }
        })
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        const OP: &str = "all_reduce";
        if self.world == 1 || buf.is_empty() {
            return Ok(());
        }
        let n = buf.len();
        let mut inner = self.lock(OP)?;
        let dev = self.stage(&mut inner, OP, n, Some(buf))?;
        self.call(&mut inner, OP, |comm, stream| {
            // SAFETY: `dev` is the scratch buffer (at least `n` f32 on this stream's device),
            // owned by `inner` and so alive until the call returns, after the stream finished
            // the op; the same send and receive buffer is NCCL's in-place form.
            unsafe {
                sys::ncclAllReduce(dev as *const c_void, dev as *mut c_void, n, sys::ncclDataType_t::ncclFloat32, sys::ncclRedOp_t::ncclSum, comm, stream)
            }
        })?;
        self.unstage(&mut inner, OP, buf)
    }

    /// NCCL gathers equal slices, so the ranks first gather their lengths and pad every slice
    /// to the longest; uneven slices cost one more small all-gather, not a wrong answer.
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
        const OP: &str = "all_gather";
        if self.world == 1 {
            return Ok(local.to_vec());
        }
        let mut inner = self.lock(OP)?;
        let lens = self.gather_lengths(&mut inner, local.len())?;
        let longest = lens.iter().copied().max().unwrap_or(0);
        if longest == 0 {
            return Ok(Vec::new());
        }
        let total = longest * self.world;
        let dev = self.stage(&mut inner, OP, total, None)?;
        let scratch = inner.scratch.as_mut().expect("staged above");
        let at = self.rank * longest;
        self.stream.memcpy_htod(local, &mut scratch.slice_mut(at..at + local.len())).map_err(|e| cuda_err(self.rank, OP, e))?;
        let mine = dev + (at * std::mem::size_of::<f32>()) as u64;
        self.call(&mut inner, OP, |comm, stream| {
            // SAFETY: `dev` is the scratch buffer (at least `world * longest` f32 on this
            // stream's device), owned by `inner` and alive until the call returns, after the
            // stream finished the op; sending from slot `rank` of the receive buffer is NCCL's
            // in-place form.
            unsafe { sys::ncclAllGather(mine as *const c_void, dev as *mut c_void, longest, sys::ncclDataType_t::ncclFloat32, comm, stream) }
        })?;
        let mut padded = vec![0f32; total];
        self.unstage(&mut inner, OP, &mut padded)?;
        let mut out = Vec::with_capacity(lens.iter().sum());
        for (r, &len) in lens.iter().enumerate() {
            out.extend_from_slice(&padded[r * longest..r * longest + len]);
        }
        Ok(out)
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        const OP: &str = "broadcast";
        if root >= self.world {
            return Err(CommError::BadRank { rank: root, world: self.world });
        }
        if self.world == 1 || buf.is_empty() {
            return Ok(());
        }
        let n = buf.len();
        let mut inner = self.lock(OP)?;
        let dev = self.stage(&mut inner, OP, n, (self.rank == root).then_some(&*buf))?;
        self.call(&mut inner, OP, |comm, stream| {
            // SAFETY: `dev` is the scratch buffer (at least `n` f32 on this stream's device),
            // owned by `inner` and alive until the call returns, after the stream finished
            // the op; the same send and receive buffer is NCCL's in-place form. `root` is
            // below `world`, which fits a c_int.
            unsafe { sys::ncclBroadcast(dev as *const c_void, dev as *mut c_void, n, sys::ncclDataType_t::ncclFloat32, root as c_int, comm, stream) }
        })?;
        if self.rank == root {
            return Ok(());
        }
        self.unstage(&mut inner, OP, buf)
    }

    fn send(&self, buf: &[f32], peer: usize) -> Result<(), CommError> {
        let to = self.peer(peer)?;
        let op = format!("send to rank {peer}");
        let n = buf.len();
        let mut inner = self.lock(&op)?;
        let dev = self.stage(&mut inner, &op, n, Some(buf))?;
        self.call(&mut inner, &op, |comm, stream| {
            // SAFETY: `dev` is the scratch buffer (at least `n` f32 on this stream's device),
            // owned by `inner` and alive until the call returns, after the stream finished
            // the op.
            unsafe { sys::ncclSend(dev as *const c_void, n, sys::ncclDataType_t::ncclFloat32, to, comm, stream) }
        })
    }

    fn recv(&self, buf: &mut [f32], peer: usize) -> Result<(), CommError> {
        let from = self.peer(peer)?;
        let op = format!("recv from rank {peer}");
        let n = buf.len();
        let mut inner = self.lock(&op)?;
        let dev = self.stage(&mut inner, &op, n, None)?;
        self.call(&mut inner, &op, |comm, stream| {
            // SAFETY: `dev` is the scratch buffer (room for at least `n` f32 on this stream's
            // device), owned by `inner` and alive until the call returns, after the stream
            // finished the op.
            unsafe { sys::ncclRecv(dev as *mut c_void, n, sys::ncclDataType_t::ncclFloat32, from, comm, stream) }
        })?;
        self.unstage(&mut inner, &op, buf)
    }

    /// An all-reduce of one value: it finishes on a rank only once every rank joined it.
    fn barrier(&self) -> Result<(), CommError> {
        const OP: &str = "barrier";
        if self.world == 1 {
            return Ok(());
        }
        let mut inner = self.lock(OP)?;
        let dev = self.stage(&mut inner, OP, 1, None)?;
        self.call(&mut inner, OP, |comm, stream| {
            // SAFETY: `dev` is the scratch buffer (at least one f32 on this stream's device),
            // owned by `inner` and alive until the call returns, after the stream finished
            // the op; in place.
            unsafe {
                sys::ncclAllReduce(dev as *const c_void, dev as *mut c_void, 1, sys::ncclDataType_t::ncclFloat32, sys::ncclRedOp_t::ncclSum, comm, stream)
            }
        })
    }

    fn device(&self) -> Option<&dyn DeviceCollective> {
        Some(self)
    }
}

impl Drop for Nccl {
    /// Finalizes the communicator (`ncclCommFinalize`, through the watchdog, so at most
    /// `timeout`) and destroys it; if the finalize fails or times out the watchdog aborts it
    /// instead, and a communicator aborted earlier is already gone.
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        if inner.comm.0.is_null() {
            return;
        }
        if let Err(e) = self.stream.context().bind_to_thread() {
            tracing::warn!(rank = self.rank, error = ?e, "could not bind the CUDA context to destroy the NCCL communicator");
        }
        let Inner { comm, watchdog, .. } = inner;
        let mut live = Live { comm: &mut comm.0, stream: &self.stream };
        let finalized = watchdog.run(&mut live, "finalize", Until::Ready, |live| {
            // SAFETY: `*live.comm` is a live communicator (not null: the watchdog's check
            // passed, so it was never aborted), and no other call on it is under way (`&mut
            // self`).
            let r = unsafe { sys::ncclCommFinalize(*live.comm) };
            status(r, *live.comm)
        });
        match finalized {
            Ok(()) => {
                let handle = std::mem::replace(&mut comm.0, std::ptr::null_mut());
                // SAFETY: `handle` is a live, finalized communicator, and this is its last use:
                // the stored handle is null now.
                if let Err(e) = unsafe { nccl_result::comm_destroy(handle) } {
                    tracing::warn!(rank = self.rank, error = %describe(e.0, std::ptr::null_mut()), "ncclCommDestroy failed");
                }
            }
            Err(e) => tracing::warn!(rank = self.rank, error = %e, "the NCCL communicator did not finalize and was aborted"),
        }
    }
}

/// A live communicator and its stream, as the watchdog polls them.
struct Live<'a> {
    /// The handle; nulled by [`Pollable::abort`].
    comm: &'a mut sys::ncclComm_t,
    /// The stream its operations run on.
    stream: &'a CudaStream,
}

impl Pollable for Live<'_> {
    fn async_error(&mut self) -> Progress {
        let comm = *self.comm;
        if comm.is_null() {
            return Progress::Failed("the NCCL communicator is gone (aborted or never made)".into());
        }
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: `comm` is a live communicator (not null: never aborted or destroyed) and
        // `state` is a valid place for NCCL to write the state to.
        let r = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
        if r != sys::ncclResult_t::ncclSuccess {
            return Progress::Failed(describe(r, comm));
        }
        match state {
            sys::ncclResult_t::ncclSuccess => Progress::Ready,
            sys::ncclResult_t::ncclInProgress => Progress::Pending,
            e => Progress::Failed(describe(e, comm)),
        }
    }

    fn stream_done(&mut self) -> Result<bool, String> {
        // SAFETY: the stream is alive (the caller holds it) and its context is current on
        // this thread; a query only reads its state.
        match unsafe { cu::cuStreamQuery(self.stream.cu_stream()) } {
            cu::CUresult::CUDA_SUCCESS => Ok(true),
            cu::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            e => Err(format!(
                "{:?} on the stream: the GPU or its context failed (a fault in an earlier kernel shows here too); check nvidia-smi and the kernel log for Xid errors",
                DriverError(e)
            )),
        }
    }

    fn abort(&mut self) {
        let comm = std::mem::replace(self.comm, std::ptr::null_mut());
        if comm.is_null() {
            return;
        }
        // SAFETY: `comm` is a live communicator and this is its last use: the stored handle
        // is null now, so nothing calls NCCL on it again. Abort stops its kernels and frees it.
        if let Err(e) = unsafe { nccl_result::comm_abort(comm) } {
            tracing::warn!(error = %describe(e.0, std::ptr::null_mut()), "ncclCommAbort failed");
        }
    }
}

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: every other field says "NCCL's default".
fn nonblocking_config() -> sys::ncclConfig_t {
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: CONFIG_MAGIC,
        version: CONFIG_VERSION,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// What a non-blocking NCCL call returned: `ncclSuccess` and `ncclInProgress` mean it was
/// taken (the watchdog waits for the rest), anything else is the error's description.
fn status(r: sys::ncclResult_t, comm: sys::ncclComm_t) -> Result<(), String> {
    match r {
        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => Ok(()),
        e => Err(describe(e, comm)),
    }
}

/// An NCCL error as a user can act on it: its name, what to check, and NCCL's last error
/// text on this thread (which may be older, or empty when the error came from NCCL's own
/// threads). `comm` is the communicator it came from (live), or null.
fn describe(r: sys::ncclResult_t, comm: sys::ncclComm_t) -> String {
    use sys::ncclResult_t as R;
    let hint = match r {
        R::ncclUnhandledCudaError => {
            "a CUDA call inside NCCL failed: check this GPU (nvidia-smi, Xid errors in the kernel log) and that the driver supports this CUDA"
        }
        R::ncclSystemError => {
            "a system call failed: check the network between the ranks, free space in /dev/shm (containers need a large --shm-size), and the open-file limit"
        }
        R::ncclInternalError => "NCCL hit an internal error: rerun with NCCL_DEBUG=WARN to see why",
        R::ncclInvalidArgument => "NCCL refused an argument: the ranks disagree about the world size or unique id, or this is a tpserve bug",
        R::ncclInvalidUsage => "NCCL was used wrongly: two ranks on one GPU, or a tpserve bug",
        R::ncclRemoteError => "a peer failed or its connection broke: check the other ranks' logs",
        _ => "rerun with NCCL_DEBUG=WARN to see why",
    };
    // SAFETY: `comm` is null or a live communicator; NCCL returns null or a NUL-terminated
    // string it owns, which is copied before any other NCCL call.
    let last = unsafe {
        let p = sys::ncclGetLastError(comm);
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().trim().to_string()
        }
    };
    if last.is_empty() {
        format!("{r:?}: {hint}")
    } else {
        format!("{r:?}: {hint} (NCCL's last message on this thread: {last})")
    }
}

/// A CUDA driver error from a copy, an allocation, or binding the context.
fn cuda_err(rank: usize, op: &str, e: DriverError) -> CommError {
    CommError::Device {
        rank,
        op: op.to_string(),
        message: format!("{e:?}: a CUDA call failed (a fault in an earlier kernel shows here too); check nvidia-smi and the kernel log for Xid errors"),
    }
}
