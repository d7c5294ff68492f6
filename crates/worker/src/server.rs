//! The worker's gRPC server: loads a shard when told (connecting the collective to its
//! peers first), runs steps on the compute pool, answers health and info, and exits on
//! Shutdown. It holds no request text and no scheduling policy.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tpserve_comm::{Collective, TcpCollective};
use tpserve_gguf::Gguf;
use tpserve_model::device::DeviceOps;
use tpserve_model::model::model_shape;
use tpserve_proto::auth::ClusterToken;
use tpserve_proto::v1;
use tpserve_types::device::{CollectiveKind, Device};
use tpserve_types::plan::Plan;
use tpserve_types::step::StepPlan;
use tracing::{info, warn};

use crate::local::LocalShard;
use crate::shard::{Shard, StepError};

impl From<StepError> for Status {
    fn from(e: StepError) -> Self {
        match e {
            StepError::Invalid { .. } => Status::invalid_argument(e.to_string()),
            StepError::Failed { .. } => Status::aborted(e.to_string()),
            StepError::Broken { .. } | StepError::NotLoaded => Status::failed_precondition(e.to_string()),
            StepError::Panicked => Status::internal(e.to_string()),
        }
    }
}

/// How a worker runs, beyond its sockets and threads.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// How long collective receives poll before blocking.
    pub comm_spin: Duration,
    /// The cluster's secret: the collective's hello proves it (the gRPC interceptor
    /// checks it separately, see [`crate::serve`]).
    pub token: Option<ClusterToken>,
    /// The only directory a `Load` may name a model file in (relative names are taken
    /// inside it); the default model is cached here too.
    pub model_dir: PathBuf,
    /// A model file this worker was started with, loadable wherever it is.
    pub model: Option<PathBuf>,
    /// With a shard loaded, no call from a coordinator for this long means it is gone:
    /// the shard and every sequence are dropped, and a `--join` worker registers again.
    pub coordinator_timeout: Duration,
    /// The device the worker computes on (`--device`).
    pub device: Device,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            comm_spin: Duration::from_micros(100),
            token: None,
            model_dir: tpserve_fetch::models_dir(),
            model: None,
            coordinator_timeout: Duration::from_secs(10),
            device: Device::Cpu,
        }
    }
}

/// The worker service. Cheap to share: everything is behind `Arc`s.
#[derive(Clone)]
pub struct WorkerService {
    inner: Arc<Inner>,
}

struct Inner {
    /// The shard and the compute threads it runs on.
    local: LocalShard,
    /// The device's operations, opened at start-up (a GPU that cannot be used is refused
    /// before the worker serves anything).
    device: DeviceOps,
    /// Where peers connect for the collective; kept across loads.
    comm_listener: StdListener,
    /// Notified by Shutdown.
    shutdown: Arc<Notify>,
    cfg: WorkerConfig,
    /// When a coordinator last called (any RPC).
    last_contact: Mutex<Instant>,
    /// Notified when the coordinator is taken for gone (see [`WorkerConfig::coordinator_timeout`]).
    coordinator_lost: Notify,
}

impl WorkerService {
    /// A worker that computes on `pool` and `cfg.device`, and accepts collective
    /// connections on `comm_listener`; fails when the device cannot be opened.
    pub fn new(pool: Arc<rayon::ThreadPool>, comm_listener: StdListener, shutdown: Arc<Notify>, cfg: WorkerConfig) -> Result<Self, String> {
        fix_mmap_threshold();
        let device = DeviceOps::open(cfg.device).map_err(|e| e.to_string())?;
        Ok(Self {
            inner: Arc::new(Inner {
                local: LocalShard::new(pool),
                device,
                comm_listener,
                shutdown,
                cfg,
                last_contact: Mutex::new(Instant::now()),
                coordinator_lost: Notify::new(),
            }),
        })
    }

    /// The device in words ("cpu (avx2)", "cuda:0 (NVIDIA H200, …)").
    pub fn device(&self) -> String {
        self.inner.device.describe()
    }

    fn touch(&self) {
        *self.inner.last_contact.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// Completes when the coordinator is taken for gone: no call for
    /// [`WorkerConfig::coordinator_timeout`]. The shard (if any) has been dropped by then.
    pub async fn coordinator_lost(&self) {
        self.inner.coordinator_lost.notified().await
    }

    /// Watches for a coordinator that stopped calling: every second, if no call came for
    /// the timeout and no step is running, drops the shard (its memory, its collective, its
    /// sequences) so the next coordinator's `Load` starts clean, and wakes
    /// [`WorkerService::coordinator_lost`]. Runs until the process ends.
    pub async fn watch_coordinator(self) {
        let timeout = self.inner.cfg.coordinator_timeout;
        let mut tick = tokio::time::interval(Duration::from_secs(1).min(timeout));
        loop {
            tick.tick().await;
            let quiet = self.inner.last_contact.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
            if quiet < timeout {
                continue;
            }
            // A running step holds the lock: a coordinator waiting on it is not gone.
            let dropped = match self.inner.local.try_lock() {
                Some(mut g) => g.take().is_some(),
                None => continue,
            };
            if dropped {
                release_freed_memory();
                warn!(quiet_s = quiet.as_secs_f64(), "no call from the coordinator: shard dropped, waiting for a coordinator's Load");
            }
            self.touch();
            self.inner.coordinator_lost.notify_waiters();
        }
    }

    /// Where this worker accepts its peers' collective connections (reported by Info, so
    /// the coordinator can hand every rank the others' addresses).
    pub fn comm_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.comm_listener.local_addr()
    }
}

/// The process's peak resident memory (VmHWM) in bytes, 0 where it cannot be read.
pub fn peak_rss_bytes() -> u64 {
    proc_status_kb("VmHWM:") * 1024
}

/// The process's resident memory now (VmRSS) in bytes, 0 where it cannot be read.
pub fn rss_bytes() -> u64 {
    proc_status_kb("VmRSS:") * 1024
}

fn proc_status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .unwrap_or(0)
}

/// Gives the heap memory a dropped shard freed back to the system. glibc keeps freed
/// chunks in its per-thread arenas, so without this every re-load would grow the
/// process by the activations and tables of the one before.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Keeps glibc's allocator behaving the same on every load. By default it serves large
/// blocks with fresh mappings and, each time one is freed, raises that threshold to the
/// freed size, so a worker's first shard gets its step buffers from mappings (returned
/// when freed) and every later shard from the heap (kept): memory after a re-load would not
/// be memory after the first load. A fixed threshold turns that adjustment off; 32 MiB is
/// the ceiling the adjustment reaches anyway, so steps keep reusing heap memory (no page
/// faults per step), and the KV cache maps its own pages (`tpserve-model`).
fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets glibc's tuning parameters; it has no preconditions.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
    }
}

/// The model file a `Load` may open: `requested` ("" = the cached default model) inside
/// `cfg.model_dir` (relative names are taken there), or the file the worker was started
/// with. Anything else is refused before it is touched, so a caller cannot probe paths.
fn allowed_model(cfg: &WorkerConfig, requested: &str) -> Result<PathBuf, Status> {
    if requested.is_empty() {
        return tpserve_fetch::resolve_model(None).map_err(|e| Status::failed_precondition(format!("cannot get the default model: {e}")));
    }
    let req = Path::new(requested);
    let dir = &cfg.model_dir;
    let refuse = || {
        Status::permission_denied(format!(
            "model {requested:?} is outside this worker's model directory {}: put the file there or start the worker with --model-dir or --model",
            dir.display()
        ))
    };
    if let Some(own) = &cfg.model {
        if req == own || (req.is_absolute() && std::fs::canonicalize(own).ok().as_deref() == Some(req)) {
            return Ok(own.clone());
        }
    }
    let joined = if req.is_absolute() { req.to_path_buf() } else { dir.join(req) };
    // Lexically first (nothing outside is touched), then with symlinks resolved.
    let normal = normalize(&joined).ok_or_else(refuse)?;
    let dir_normal = normalize(&std::path::absolute(dir).unwrap_or_else(|_| dir.clone())).ok_or_else(refuse)?;
    if !normal.starts_with(&dir_normal) {
        return Err(refuse());
    }
    let real = std::fs::canonicalize(&normal).map_err(|e| Status::failed_precondition(format!("cannot open model {}: {e}", normal.display())))?;
    let real_dir = std::fs::canonicalize(dir).unwrap_or(dir_normal);
    if !real.starts_with(&real_dir) {
        return Err(refuse());
    }
    Ok(real)
}

/// `p` made absolute with `.` and `..` resolved lexically; `None` if `..` climbs above the root.
fn normalize(p: &Path) -> Option<PathBuf> {
    let abs = std::path::absolute(p).ok()?;
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Some(out)
}

/// The Load stream's sender: progress messages, then the final one or the error.
type Progress = mpsc::Sender<Result<v1::LoadProgress, Status>>;

fn progress_msg(phase: &str, done: u64, total: u64) -> v1::LoadProgress {
    v1::LoadProgress {
        phase: phase.into(),
        bytes_done: done,
        bytes_total: total,
        done: false,
        shard: None,
        peak_rss_bytes: peak_rss_bytes(),
        kv_bytes: 0,
        rss_bytes: rss_bytes(),
        repacked_bytes: 0,
        device: String::new(),
        collective: String::new(),
    }
}

/// `count` fresh NCCL unique ids (this worker is rank 0 of a load whose ranks talk NCCL).
#[cfg(feature = "cuda")]
fn make_nccl_ids(count: usize) -> Result<Vec<Vec<u8>>, Status> {
    (0..count).map(|_| tpserve_comm::nccl::unique_id().map(|id| id.to_vec()).map_err(|e| Status::internal(format!("cannot make an NCCL id: {e}")))).collect()
}

#[cfg(not(feature = "cuda"))]
fn make_nccl_ids(_: usize) -> Result<Vec<Vec<u8>>, Status> {
    Err(Status::failed_precondition("this worker was built without CUDA, so it cannot make NCCL ids: build it with `cargo build --release --features cuda`"))
}

/// Loads the shard `req` describes, reporting progress on `tx`. Runs on a blocking thread.
/// Returns the shard and the collective its groups talk through.
fn load(inner: &Inner, req: v1::LoadRequest, tx: &Progress) -> Result<(Shard, CollectiveKind), Status> {
    let path = allowed_model(&inner.cfg, &req.model_path)?;
    let g = Gguf::open(&path).map_err(|e| Status::failed_precondition(format!("cannot open model {}: {e}", path.display())))?;
    if req.model_bytes != 0 && g.file_len() as u64 != req.model_bytes {
        return Err(Status::failed_precondition(format!(
            "model {} here is {} bytes, the coordinator planned with a {}-byte file: give every worker the same model",
            path.display(),
            g.file_len(),
            req.model_bytes
        )));
    }
    let (tp, pp, rank) = (req.tp as usize, req.pp as usize, req.rank as usize);
    let shape = model_shape(&g).map_err(|e| Status::failed_precondition(e.to_string()))?;
    let plan = Plan::new(shape, tp, pp).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if rank >= plan.world() || req.comm_addrs.len() != plan.world() {
        return Err(Status::invalid_argument(format!("rank {rank} with {} collective addresses in a world of {}", req.comm_addrs.len(), plan.world())));
    }
    let shard = plan.shard(rank);
    let addrs = req
        .comm_addrs
        .iter()
        .map(|a| resolve(a).ok_or_else(|| Status::invalid_argument(format!("collective address {a:?} is not host:port"))))
        .collect::<Result<Vec<_>, _>>()?;
    let ms = |v: u32, default_s: u64| if v == 0 { Duration::from_secs(default_s) } else { Duration::from_millis(v as u64) };
    let timeout = ms(req.comm_timeout_ms, 10);
    let connect_within = ms(req.connect_timeout_ms, 600);
    let stage_timeout = ms(req.stage_timeout_ms, 300);

    let kv = tpserve_types::kv::KvLayout::try_from(req.kv.clone().ok_or_else(|| Status::invalid_argument("the load request has no KV cache layout"))?)?;
    if kv.groups.iter().map(|g| g.layers.len()).sum::<usize>() != plan.shape.n_layers {
        return Err(Status::invalid_argument(format!(
            "the KV cache layout covers {} layers, the model has {}",
            kv.groups.iter().map(|g| g.layers.len()).sum::<usize>(),
            plan.shape.n_layers
        )));
    }

    let cfg = tpserve_model::config::ModelConfig::from_gguf(&g).map_err(|e| Status::failed_precondition(e.to_string()))?;
    if let Some((l, w)) = kv.groups.iter().flat_map(|g| g.layers.iter().map(move |&l| (l, g.window))).find(|&(l, w)| l >= cfg.n_layers || cfg.window(l) != w) {
        return Err(Status::invalid_argument(format!("the KV cache layout gives layer {l} window {w:?}, the model does not")));
    }

    let _ = tx.blocking_send(Ok(progress_msg("connecting", 0, shard.bytes)));
    let world = TcpCollective::connect_within(
        rank,
        &inner.comm_listener,
        &addrs,
        req.session,
        inner.cfg.token.as_ref().map_or(&[][..], |t| t.as_bytes()),
        connect_within,
        timeout,
    )
    .map_err(|e| Status::unavailable(format!("rank {rank} cannot connect to its peers: {e}")))?
    .with_spin(inner.cfg.comm_spin);
    let stage = shard.stage;
    let tp_members: Vec<usize> = (stage * tp..(stage + 1) * tp).collect();
    let pp_members: Vec<usize> = (0..pp).map(|s| s * tp + shard.tp.rank).collect();
    let comm_err = |e: tpserve_comm::CommError| Status::internal(e.to_string());
    let tp_comm: Arc<dyn Collective> = Arc::new(world.subgroup(&tp_members).map_err(comm_err)?);
    // A later stage waits for the earlier stages' whole chunk, not just a peer's skew.
    let pp_comm: Option<Arc<dyn Collective>> =
        if pp > 1 { Some(Arc::new(world.subgroup(&pp_members).and_then(|g| g.with_io_timeout(stage_timeout)).map_err(comm_err)?)) } else { None };

    let collective = collective_of(&req)?;
    let (tp_comm, pp_comm) = match collective {
        CollectiveKind::Tcp => (tp_comm, pp_comm),
        CollectiveKind::Nccl => nccl_groups(inner, &req, &shard, timeout, stage_timeout)?,
    };

    let _ = tx.blocking_send(Ok(progress_msg("loading", 0, shard.bytes)));
    let loaded = inner
        .local
        .pool()
        .install(|| Shard::load(&inner.device, &g, &shard, tp_comm, pp_comm, &kv))
        .map_err(|e| Status::failed_precondition(format!("rank {rank} cannot load its shard: {e}")))?;
    inner.local.pool().install(|| {
        loaded.model().prefault(&mut |done, total| {
            let _ = tx.blocking_send(Ok(progress_msg("loading", done, total)));
        })
    });
    // No barrier here: ranks may finish reading at very different times (a cold disk), and
    // the coordinator sends no step before every rank has reported done.
    drop(world);
    Ok((loaded, collective))
}

/// A rank's tensor-parallel group and, with pp > 1, its pipeline group.
type Groups = (Arc<dyn Collective>, Option<Arc<dyn Collective>>);

/// The collective a load asks for ("" is TCP, as before there was a choice).
fn collective_of(req: &v1::LoadRequest) -> Result<CollectiveKind, Status> {
    match req.collective.as_str() {
        "" | "tcp" => Ok(CollectiveKind::Tcp),
        "nccl" => Ok(CollectiveKind::Nccl),
        other => Err(Status::invalid_argument(format!("collective {other:?}: expected tcp or nccl"))),
    }
}

// The coordinator checks the ids it forwards against tpserve-types' size and NCCL takes
// tpserve-comm's: the two must agree.
const _: () = assert!(tpserve_comm::NCCL_ID_BYTES == tpserve_types::device::NCCL_ID_BYTES);

/// An NCCL unique id from a load request, checked for its length.
#[cfg(feature = "cuda")]
fn nccl_id(bytes: &[u8], what: &str) -> Result<[u8; tpserve_comm::NCCL_ID_BYTES], Status> {
    bytes.try_into().map_err(|_| Status::invalid_argument(format!("the {what} NCCL id has {} bytes, not {}", bytes.len(), tpserve_comm::NCCL_ID_BYTES)))
}

/// This rank's tensor-parallel and pipeline groups as NCCL communicators on its GPU's
/// stream, from the ids in the load request (made by rank 0's worker; see `NcclIds`). The
/// tensor-parallel group first on every rank, so no two ranks wait on each other's second
/// communicator. Every call on them is bounded by the watchdog (`tpserve_comm::watchdog`).
#[cfg(feature = "cuda")]
fn nccl_groups(
    inner: &Inner,
    req: &v1::LoadRequest,
    shard: &tpserve_types::plan::RankShard,
    timeout: Duration,
    stage_timeout: Duration,
) -> Result<Groups, Status> {
    let DeviceOps::Cuda(cuda) = &inner.device else {
        return Err(Status::failed_precondition(format!(
            "the load asks for NCCL, but this worker computes on {}: start it with --device cuda[:N]",
            inner.device.describe()
        )));
    };
    let (tp, pp) = (req.tp as usize, req.pp as usize);
    let fail = |e: tpserve_comm::CommError| Status::unavailable(format!("rank {} cannot make its NCCL communicators: {e}", shard.rank));
    let tp_id = nccl_id(&req.nccl_tp_id, "tensor-parallel")?;
    let tp_comm: Arc<dyn Collective> = Arc::new(tpserve_comm::nccl::Nccl::new(cuda.stream(), &tp_id, shard.tp.rank, tp, timeout).map_err(fail)?);
    let pp_comm: Option<Arc<dyn Collective>> = if pp > 1 {
        let pp_id = nccl_id(&req.nccl_pp_id, "pipeline")?;
        Some(Arc::new(tpserve_comm::nccl::Nccl::new(cuda.stream(), &pp_id, shard.stage, pp, stage_timeout).map_err(fail)?))
    } else {
        None
    };
    Ok((tp_comm, pp_comm))
}

#[cfg(not(feature = "cuda"))]
fn nccl_groups(_: &Inner, _: &v1::LoadRequest, shard: &tpserve_types::plan::RankShard, _: Duration, _: Duration) -> Result<Groups, Status> {
    Err(Status::failed_precondition(format!(
        "the load asks for NCCL, but rank {}'s worker was built without CUDA: build it with `cargo build --release --features cuda`, or load with --collective tcp",
        shard.rank
    )))
}

/// Resolves `host:port` (names too) to its first socket address.
fn resolve(addr: &str) -> Option<SocketAddr> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs().ok()?.next()
}

#[tonic::async_trait]
impl tpserve_proto::Worker for WorkerService {
    async fn info(&self, _: Request<v1::InfoRequest>) -> Result<Response<v1::InfoResponse>, Status> {
        self.touch();
        let shard = self.inner.local.lock().as_ref().map(|s| v1::Shard::from(s.shard()));
        Ok(Response::new(v1::InfoResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            threads: self.inner.local.pool().current_num_threads() as u32,
            comm_port: self.comm_addr().map(|a| a.port() as u32).unwrap_or(0),
            comm_addr: self.comm_addr().map(|a| a.to_string()).unwrap_or_default(),
            shard,
            peak_rss_bytes: peak_rss_bytes(),
            device: self.inner.cfg.device.to_string(),
            gpu_id: self.inner.device.gpu_id(),
            nccl: DeviceOps::cuda_built(),
        }))
    }

    async fn nccl_ids(&self, req: Request<v1::NcclIdsRequest>) -> Result<Response<v1::NcclIdsResponse>, Status> {
        self.touch();
        let count = req.into_inner().count;
        if count > 64 {
            return Err(Status::invalid_argument(format!("{count} NCCL ids asked for; at most 64")));
        }
        Ok(Response::new(v1::NcclIdsResponse { ids: make_nccl_ids(count as usize)? }))
    }

    type LoadStream = ReceiverStream<Result<v1::LoadProgress, Status>>;

    async fn load(&self, req: Request<v1::LoadRequest>) -> Result<Response<Self::LoadStream>, Status> {
        self.touch();
        let req = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        info!(rank = req.rank, tp = req.tp, pp = req.pp, model = %req.model_path, "loading");
        tokio::task::spawn_blocking(move || {
            // Drop any previous shard first: its memory and its collective go.
            this.inner.local.set(None);
            release_freed_memory();
            let loaded = load(&this.inner, req, &tx);
            this.touch();
            match loaded {
                Ok((shard, collective)) => {
                    let repacked_bytes = shard.model().repacked_bytes();
                    let done = v1::LoadProgress {
                        phase: "ready".into(),
                        bytes_done: shard.shard().bytes,
                        bytes_total: shard.shard().bytes,
                        done: true,
                        shard: Some(v1::Shard::from(shard.shard())),
                        peak_rss_bytes: peak_rss_bytes(),
                        kv_bytes: shard.kv_bytes(),
                        rss_bytes: rss_bytes(),
                        repacked_bytes: repacked_bytes as u64,
                        device: shard.model().device(),
                        collective: collective.to_string(),
                    };
                    info!(
                        rank = shard.shard().rank,
                        weight_bytes = shard.model().weight_bytes(),
                        repacked_bytes,
                        device = %shard.model().device(),
                        "loaded"
                    );
                    this.inner.local.set(Some(shard));
                    let _ = tx.blocking_send(Ok(done));
                }
                Err(status) => {
                    warn!(error = %status.message(), "load failed");
                    let _ = tx.blocking_send(Err(status));
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn step(&self, req: Request<v1::StepRequest>) -> Result<Response<v1::StepResponse>, Status> {
        self.touch();
        let plan = StepPlan::try_from(req.into_inner())?;
        let out = self.inner.local.step(plan).await;
        self.touch();
        Ok(Response::new(v1::StepResponse::from(&out?)))
    }

    async fn health(&self, _: Request<v1::HealthRequest>) -> Result<Response<v1::HealthResponse>, Status> {
        self.touch();
        let (ready, reason) = match self.inner.local.health() {
            None | Some(Ok(())) => (true, String::new()),
            Some(Err(why)) => (false, why),
        };
        Ok(Response::new(v1::HealthResponse { ready, reason }))
    }

    async fn shutdown(&self, _: Request<v1::ShutdownRequest>) -> Result<Response<v1::ShutdownResponse>, Status> {
        info!("shutdown requested");
        self.inner.shutdown.notify_one();
        Ok(Response::new(v1::ShutdownResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_names_its_collective_or_is_refused_naming_the_value() {
        let with = |c: &str| v1::LoadRequest { collective: c.into(), ..Default::default() };
        assert_eq!(collective_of(&with("")).unwrap(), CollectiveKind::Tcp);
        assert_eq!(collective_of(&with("tcp")).unwrap(), CollectiveKind::Tcp);
        assert_eq!(collective_of(&with("nccl")).unwrap(), CollectiveKind::Nccl);
        let e = collective_of(&with("mpi")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("\"mpi\""), "{}", e.message());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_worker_without_cuda_refuses_nccl_ids_and_nccl_loads_saying_how_to_build_one() {
        let e = make_nccl_ids(2).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("--features cuda"), "{}", e.message());
    }
}
