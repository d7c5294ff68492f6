//! The workers of a cluster, seen from the coordinator: connecting to them, loading the
//! plan's shards onto them (with progress), fanning every step out to all of them and
//! looking at every answer, and shutting them down.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use prost::Message;
use tokio::sync::oneshot;
use tonic::{Code, Request, Status};
use tpserve_proto::auth::{AuthChannel, ClusterToken, SendToken};
use tpserve_proto::tls::Tls;
use tpserve_proto::v1;
use tpserve_proto::WorkerClient;
use tpserve_types::device::{choose_collective, nccl_communicators, nccl_ids_of, CollectiveChoice, CollectiveKind, Device, RankDevice, NCCL_ID_BYTES};
use tpserve_types::kv::KvLayout;
use tpserve_types::plan::{Plan, RankShard};
use tpserve_types::step::{LogitsWanted, StepOutput, StepPlan};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::backend::{Backend, Pending, StepReply};
use crate::error::ClusterError;
use crate::join::JoinRegistry;

/// How long the coordinator waits for things.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Reaching a worker (it may still be starting).
    pub connect: Duration,
    /// Every collective wait on the workers: a dead or silent peer is an error within it.
    pub comm: Duration,
    /// One step on one worker, compute included.
    pub step: Duration,
    /// Loading one shard (connecting the collective, reading the weights).
    pub load: Duration,
    /// A step without sequences (the idle probe): no compute, so a rank that does not
    /// answer it within this is stopped or cut off.
    pub probe: Duration,
    /// While a step runs, every rank that has not answered yet is asked for its health
    /// this often, and must answer within 90% of it: a rank that misses [`HEALTH_MISSES`] in
    /// a row (about 3 s by default) is taken for stopped or partitioned, long before the
    /// collective deadline. A busy rank still answers: health is served beside the compute.
    pub health: Duration,
}

/// Health checks a rank may miss in a row during a step before it counts as lost.
pub const HEALTH_MISSES: u32 = 2;

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(30),
            comm: Duration::from_secs(10),
            step: Duration::from_secs(300),
            load: Duration::from_secs(600),
            probe: Duration::from_secs(2),
            health: Duration::from_secs(1),
        }
    }
}

/// The workers of a cluster, to stop them.
pub struct Workers(Vec<RemoteWorker>);

impl Workers {
    /// Asks every worker to exit (best effort, each bounded by a short deadline).
    pub async fn shutdown(&self) {
        let calls = self.0.iter().map(|w| {
            let mut c = w.client.clone();
            async move {
                let _ = tokio::time::timeout(Duration::from_secs(2), c.shutdown(v1::ShutdownRequest {})).await;
            }
        });
        futures::future::join_all(calls).await;
    }
}

/// One worker as the coordinator knows it.
#[derive(Clone)]
pub struct RemoteWorker {
    /// host:port of its gRPC server.
    pub addr: String,
    client: WorkerClient<AuthChannel>,
    /// What it said about itself when we connected.
    pub info: v1::InfoResponse,
}

/// Connects to the worker at `addr` (host:port), retrying until `timeout`, and asks for its
/// info; every call carries `token`, over TLS when `tls` is set. A worker that refuses the
/// token fails at once.
pub async fn connect(addr: &str, timeout: Duration, token: Option<&ClusterToken>, tls: Option<&Tls>) -> Result<RemoteWorker, ClusterError> {
    let endpoint = tpserve_proto::tls::endpoint(addr, tls).map_err(|message| ClusterError::Connect { addr: addr.into(), message })?;
    let endpoint = endpoint.tcp_nodelay(true).connect_timeout(Duration::from_secs(2));
    let start = tokio::time::Instant::now();
    let channel = loop {
        match endpoint.connect().await {
            Ok(c) => break c,
            Err(e) if start.elapsed() >= timeout => {
                let why = causes(&e);
                return Err(ClusterError::Connect {
                    addr: addr.into(),
                    message: format!("{why} (waited {timeout:?}); is `tpserve worker` running there, with the same TLS settings?"),
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let mut client = WorkerClient::with_interceptor(channel, SendToken::new(token)).max_decoding_message_size(tpserve_proto::MAX_MESSAGE_BYTES);
    let left = timeout.saturating_sub(start.elapsed()).max(Duration::from_secs(1));
    let info = tokio::time::timeout(left, client.info(v1::InfoRequest {}))
        .await
        .map_err(|_| ClusterError::Connect { addr: addr.into(), message: format!("it accepted the connection but did not answer within {left:?}") })?
        .map_err(|s| match s.code() {
            Code::Unauthenticated => ClusterError::Unauthenticated { addr: addr.into(), message: s.message().into() },
            _ => {
                let below = std::error::Error::source(&s).map(|c| format!(": {}", causes(c))).unwrap_or_default();
                ClusterError::Connect { addr: addr.into(), message: format!("{}{below} (is it a tpserve worker, with the same TLS settings?)", s.message()) }
            }
        })?
        .into_inner();
    if info.version != env!("CARGO_PKG_VERSION") {
        return Err(ClusterError::Connect {
            addr: addr.into(),
            message: format!("it runs tpserve {}, this coordinator {}: run the same version everywhere", info.version, env!("CARGO_PKG_VERSION")),
        });
    }
    Ok(RemoteWorker { addr: addr.into(), client, info })
}

/// An error with its causes, outermost first ("transport error: invalid peer certificate: ...").
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        let s = c.to_string();
        if !out.contains(&s) {
            out += &format!(": {s}");
        }
        next = c.source();
    }
    out
}

/// Connects to every worker in `addrs` at once (see [`connect`]), in the same order; fails
/// naming every worker that could not be reached.
pub async fn connect_all(addrs: &[String], timeout: Duration, token: Option<&ClusterToken>, tls: Option<&Tls>) -> Result<Vec<RemoteWorker>, ClusterError> {
    let results = futures::future::join_all(addrs.iter().map(|a| connect(a, timeout, token, tls))).await;
    let mut workers = Vec::with_capacity(addrs.len());
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(w) => workers.push(w),
            Err(e) => errors.push(e),
        }
    }
    match errors.len() {
        0 => Ok(workers),
        1 => Err(errors.remove(0)),
        _ => Err(ClusterError::Unreachable(errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))),
    }
}

/// What a worker says while it loads its shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadProgress {
    /// What it is doing ("connecting", "loading", "ready").
    pub phase: String,
    /// Shard bytes read so far.
    pub bytes_done: u64,
    /// Shard bytes to read in all.
    pub bytes_total: u64,
    /// The shard is loaded (the last message).
    pub done: bool,
}

impl From<&v1::LoadProgress> for LoadProgress {
    fn from(p: &v1::LoadProgress) -> Self {
        Self { phase: p.phase.clone(), bytes_done: p.bytes_done, bytes_total: p.bytes_total, done: p.done }
    }
}

/// The host part of `host:port` (IPv6 in brackets kept as it is).
fn host_of(addr: &str) -> &str {
    let a = addr.rsplit_once("://").map_or(addr, |(_, rest)| rest);
    a.rsplit_once(':').map_or(a, |(h, _)| h)
}

/// Where peers reach `w`'s collective: the address it bound, unless that is every interface
/// (0.0.0.0, ::), in which case the host the coordinator reached it at.
fn comm_addr(w: &RemoteWorker) -> String {
    match w.info.comm_addr.parse::<std::net::SocketAddr>() {
        Ok(a) if !a.ip().is_unspecified() => a.to_string(),
        _ => format!("{}:{}", host_of(&w.addr), w.info.comm_port),
    }
}

/// What loading reported for one rank.
#[derive(Debug, Clone)]
pub struct LoadedRank {
    /// The worker's gRPC address.
    pub addr: String,
    /// What it holds.
    pub shard: RankShard,
    /// The worker's peak resident memory after loading.
    pub peak_rss_bytes: u64,
    /// The worker's resident memory right after loading (flat across re-loads).
    pub rss_bytes: u64,
    /// Its compute threads.
    pub threads: u32,
    /// Bytes the worker reserved for the KV cache.
    pub kv_bytes: u64,
    /// Bytes of weights the worker repacked for its GEMM kernels (or copied onto huge pages
    /// for its row kernels), beside the mapped file.
    pub repacked_bytes: u64,
    /// The device the shard is on, in words ("cpu (avx2)", "cuda:0 (NVIDIA H200, …)").
    pub device: String,
    /// The collective its groups talk through ("tcp", "nccl").
    pub collective: String,
}

/// What a cluster is loaded with: the plan, the model as the workers see it, the KV cache,
/// deadlines, and the token. Kept, so that a cluster that lost a rank can load again.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Which rank holds what.
    pub plan: Plan,
    /// The model's context length.
    pub context_len: usize,
    /// The KV cache every stage reserves its part of.
    pub kv: KvLayout,
    /// The model file as the workers see it ("" = their cached default model).
    pub model_path: String,
    /// Its size in bytes (0 = unchecked).
    pub model_bytes: u64,
    /// How long to wait for things.
    pub timeouts: Timeouts,
    /// The cluster token every call carries.
    pub token: Option<ClusterToken>,
    /// TLS for every connection to a worker, when set.
    pub tls: Option<Tls>,
    /// The collective asked for (`--collective`): chosen from the workers' devices at
    /// every load ([`tpserve_types::device::choose_collective`]).
    pub collective: CollectiveChoice,
}

/// The workers of a loaded plan, ready to step.
pub struct Cluster {
    /// In rank order; shared with the steps in flight.
    workers: Arc<[RemoteWorker]>,
    spec: ClusterSpec,
    /// Where `--join` workers register: a lost rank's replacement may come from it.
    joins: Option<Arc<JoinRegistry>>,
    /// Why the cluster cannot step any more (a worker was lost), once it cannot.
    failed: Option<String>,
    /// What each rank reported when its shard was loaded, in rank order (for the startup
    /// summary: shards, memory, threads, KV bytes).
    pub loaded: Vec<LoadedRank>,
    /// Per rank: resolves once the rank has answered the last step submitted to it. The next
    /// step's call to that rank waits for it, so every rank runs its steps in submission order
    /// while several are in flight (a pipeline's stages each busy with a batch of its own).
    /// The steps in flight take their second half's turns on the ranks with vocabulary slices
    /// ([`HeadRows`](tpserve_types::step::HeadRows)) when their first half is answered. A new one on every (re)load.
    turns: Turns,
    /// With pp > 1, the ranks with a vocabulary slice and whether each is on the last stage:
    /// those a step's head rows go to.
    slices: Vec<(usize, bool)>,
}

/// Per rank, the receiver of the last call's "answered" (see [`Cluster::turns`]).
type Turns = Arc<std::sync::Mutex<Vec<Option<oneshot::Receiver<()>>>>>;

fn new_turns(world: usize) -> Turns {
    Arc::new(std::sync::Mutex::new((0..world).map(|_| None).collect()))
}

/// The next turn on each of `ranks`, after the call taken before it on that rank.
fn take_turns(turns: &Turns, ranks: &[usize]) -> Vec<Turn> {
    let mut slots = turns.lock().expect("no code panics holding the turns");
    ranks
        .iter()
        .map(|&r| {
            let (done, next) = oneshot::channel();
            Turn { after: slots[r].replace(next), done }
        })
        .collect()
}

impl Cluster {
    /// Loads `spec.plan`'s shards onto `workers` (world rank = position).
    /// `progress(rank, message)` is called with every progress message of every worker.
    /// Fails, naming every rank that failed, unless all load.
    pub async fn load(workers: Vec<RemoteWorker>, spec: ClusterSpec, progress: impl Fn(usize, &LoadProgress) + Sync) -> Result<Cluster, ClusterError> {
        let loaded = load_shards(&workers, &spec, progress).await?;
        let turns = new_turns(workers.len());
        let slices = if spec.plan.pp > 1 {
            spec.plan.shards().into_iter().filter(|s| !s.vocab.is_empty()).map(|s| (s.rank, s.last_stage)).collect()
        } else {
            Vec::new()
        };
        Ok(Cluster { workers: workers.into(), spec, joins: None, failed: None, loaded, turns, slices })
    }

    /// Takes replacements for lost ranks from `joins` (workers that `--join`ed as spares).
    pub fn with_joins(mut self, joins: Arc<JoinRegistry>) -> Self {
        self.joins = Some(joins);
        self
    }

    /// Tries once to bring a failed cluster back: every rank must answer (the worker at a
    /// lost rank's address started again, or a spare that joined), then every rank loads
    /// its shard again — a collective cannot lose a member, so the whole group reloads.
    /// Ok once the cluster can serve; an error saying what it waits for otherwise.
    pub async fn recover(&mut self) -> Result<(), ClusterError> {
        if self.failed.is_none() {
            return Ok(());
        }
        let t = std::time::Instant::now();
        let (token, tls) = (self.spec.token.clone(), self.spec.tls.clone());
        let reach = Duration::from_secs(1);
        let tries = self.workers.iter().map(|w| connect(&w.addr, reach, token.as_ref(), tls.as_ref()));
        let results = futures::future::join_all(tries).await;
        let mut workers = Vec::with_capacity(results.len());
        for (rank, r) in results.into_iter().enumerate() {
            let w = match r {
                Ok(w) => w,
                Err(e) => match self.joins.as_ref().and_then(|j| j.replace_with_spare(rank)) {
                    Some(spare) => connect(&spare, reach, token.as_ref(), tls.as_ref()).await?,
                    None => return Err(ClusterError::Unavailable(format!("waiting for rank {rank} to come back ({e})"))),
                },
            };
            workers.push(w);
        }
        info!(waited_ms = t.elapsed().as_millis() as u64, "every rank answers again: reloading the plan on all of them");
        let loaded = load_shards(&workers, &self.spec, |_, _| {}).await?;
        self.turns = new_turns(workers.len());
        self.workers = workers.into();
        self.loaded = loaded;
        self.failed = None;
        info!(took_ms = t.elapsed().as_millis() as u64, "the cluster is loaded again");
        Ok(())
    }

    /// The plan the shards were loaded for.
    pub fn plan(&self) -> &Plan {
        &self.spec.plan
    }

    /// Why the cluster cannot serve, if it cannot.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Asks every worker to exit (best effort, each bounded by a short deadline).
    pub async fn shutdown(&self) {
        self.workers_handle().shutdown().await;
    }

    /// What is needed to stop the workers after the cluster itself was handed away.
    pub fn workers_handle(&self) -> Workers {
        Workers(self.workers.to_vec())
    }
}

/// Names the rank whose loss explains `errors` (one per failing rank) and says what happened.
fn diagnose(workers: &[RemoteWorker], errors: &[(usize, Status)]) -> String {
    // A transport failure or timeout points at the worker that is gone; one that refused
    // the step (no shard, broken) comes next; a worker that answered "aborted" only saw a
    // peer disappear.
    let rank_of = |s: &Status| match s.code() {
        Code::Aborted => 2,
        Code::FailedPrecondition | Code::InvalidArgument => 1,
        _ => 0,
    };
    let culprit = errors.iter().min_by_key(|(r, s)| (rank_of(s), *r));
    let (rank, status) = culprit.expect("diagnose is called with errors");
    let what = match status.code() {
        Code::DeadlineExceeded | Code::Cancelled => format!("did not answer ({})", status.message()),
        Code::Aborted | Code::FailedPrecondition => status.message().to_string(),
        _ => format!("is unreachable ({})", status.message()),
    };
    let others = errors.iter().filter(|(r, _)| r != rank).map(|(r, _)| r.to_string()).collect::<Vec<_>>();
    let mut msg = format!("worker rank {rank} ({}) {what}", workers[*rank].addr);
    if !others.is_empty() {
        msg += &format!("; ranks {} failed with it", others.join(", "));
    }
    msg + "; the cluster reloads once every rank answers again"
}

/// Loads `spec`'s shards onto `workers` (world rank = position), each rank's progress
/// passed to `progress`; every rank's report, or an error naming every rank that failed.
async fn load_shards(workers: &[RemoteWorker], spec: &ClusterSpec, progress: impl Fn(usize, &LoadProgress) + Sync) -> Result<Vec<LoadedRank>, ClusterError> {
    let (plan, timeouts) = (&spec.plan, spec.timeouts);
    if workers.len() != plan.world() {
        return Err(ClusterError::Plan(format!("tp = {} x pp = {} needs {} workers, {} were given", plan.tp, plan.pp, plan.world(), workers.len())));
    }
    let comm_addrs: Vec<String> = workers.iter().map(comm_addr).collect();
    let (collective, nccl_ids) = collective_for(workers, spec).await?;
    // Different for every load, so no rank mistakes a connection of an earlier attempt
    // for one of this attempt's peers.
    let session = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1;
    let loads = workers.iter().enumerate().map(|(rank, w)| {
        let req = v1::LoadRequest {
            model_path: spec.model_path.clone(),
            model_bytes: spec.model_bytes,
            tp: plan.tp as u32,
            pp: plan.pp as u32,
            rank: rank as u32,
            comm_addrs: comm_addrs.clone(),
            comm_timeout_ms: timeouts.comm.as_millis() as u32,
            connect_timeout_ms: timeouts.load.as_millis() as u32,
            stage_timeout_ms: timeouts.step.as_millis() as u32,
            session,
            kv: Some(v1::KvLayout::from(&spec.kv)),
            collective: collective.to_string(),
            nccl_tp_id: Vec::new(),
            nccl_pp_id: Vec::new(),
        };
        let req = match &nccl_ids {
            Some(ids) => {
                let (t, p) = nccl_ids_of(plan.tp, plan.pp, rank);
                v1::LoadRequest { nccl_tp_id: ids[t].clone(), nccl_pp_id: p.map(|p| ids[p].clone()).unwrap_or_default(), ..req }
            }
            None => req,
        };
        let mut client = w.client.clone();
        let progress = &progress;
        let load = async move {
            let mut stream = client.load(req).await?.into_inner();
            while let Some(msg) = stream.message().await? {
                progress(rank, &LoadProgress::from(&msg));
                if msg.done {
                    return msg
                        .shard
                        .map(|s| (s.to_rank_shard(), msg.peak_rss_bytes, msg.rss_bytes, msg.kv_bytes, msg.repacked_bytes, msg.device, msg.collective))
                        .ok_or_else(|| Status::internal("the last load message has no shard"));
                }
            }
            Err(Status::internal("the load stream ended before the shard was ready"))
        };
        async move {
            tokio::time::timeout(timeouts.load, load).await.unwrap_or_else(|_| Err(Status::deadline_exceeded(format!("not loaded within {:?}", timeouts.load))))
        }
    });
    let results = futures::future::join_all(loads).await;
    let mut loaded = Vec::new();
    let mut errors = Vec::new();
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Ok((shard, peak_rss_bytes, rss_bytes, kv_bytes, repacked_bytes, device, collective)) => loaded.push(LoadedRank {
                addr: workers[rank].addr.clone(),
                shard,
                peak_rss_bytes,
                rss_bytes,
                threads: workers[rank].info.threads,
                kv_bytes,
                repacked_bytes,
                device,
                collective,
            }),
            Err(s) => errors.push(format!("rank {rank} ({}): {}", workers[rank].addr, s.message())),
        }
    }
    if !errors.is_empty() {
        return Err(ClusterError::Load(errors.join("; ")));
    }
    for (l, want) in loaded.iter().zip(plan.shards()) {
        if l.shard.layers != want.layers || l.shard.vocab != want.vocab || l.shard.heads != want.heads {
            return Err(ClusterError::Load(format!("rank {} loaded a different shard than planned (is its model file the same?)", want.rank)));
        }
    }
    Ok(loaded)
}

/// The collective this load uses, from the workers' devices and `spec.collective` (a mix
/// of CPU and GPU workers, or NCCL where it cannot work, is refused with what would), and
/// with NCCL the communicators' unique ids, made by rank 0's worker.
async fn collective_for(workers: &[RemoteWorker], spec: &ClusterSpec) -> Result<(CollectiveKind, Option<Vec<Vec<u8>>>), ClusterError> {
    let ranks = workers
        .iter()
        .enumerate()
        .map(|(rank, w)| {
            let device = if w.info.device.is_empty() { Ok(Device::Cpu) } else { w.info.device.parse::<Device>() };
            let device = device.map_err(|e| ClusterError::Plan(format!("rank {rank} ({}) reports {e}", w.addr)))?;
            Ok(RankDevice { device, gpu_id: w.info.gpu_id.clone(), nccl: w.info.nccl })
        })
        .collect::<Result<Vec<_>, ClusterError>>()?;
    let kind = choose_collective(&ranks, spec.collective).map_err(ClusterError::Plan)?;
    if kind == CollectiveKind::Tcp {
        return Ok((kind, None));
    }
    let count = nccl_communicators(spec.plan.tp, spec.plan.pp);
    let rank0 = &workers[0];
    let mut client = rank0.client.clone();
    let ids = tokio::time::timeout(spec.timeouts.comm.max(Duration::from_secs(2)), client.nccl_ids(v1::NcclIdsRequest { count: count as u32 }))
        .await
        .map_err(|_| ClusterError::Load(format!("rank 0 ({}) did not make NCCL ids in time", rank0.addr)))?
        .map_err(|s| ClusterError::Load(format!("rank 0 ({}) cannot make NCCL ids: {}", rank0.addr, s.message())))?
        .into_inner()
        .ids;
    if ids.len() != count || ids.iter().any(|id| id.len() != NCCL_ID_BYTES) {
        return Err(ClusterError::Load(format!("rank 0 ({}) sent {} NCCL ids for {count} communicators, or ids of the wrong size", rank0.addr, ids.len())));
    }
    Ok((kind, Some(ids)))
}

impl Backend for Cluster {
    fn context_len(&self) -> usize {
        self.spec.context_len
    }

    fn kv_layout(&self) -> &KvLayout {
        &self.spec.kv
    }

    fn recover(&mut self) -> impl std::future::Future<Output = Result<(), ClusterError>> + Send {
        Cluster::recover(self)
    }

    /// Sends the step to every rank and looks at every answer: a failure anywhere fails
    /// the cluster (naming the rank that explains it), except a step every rank refused,
    /// which leaves the cluster as it was.
    async fn step(&mut self, plan: &StepPlan) -> Result<StepReply, ClusterError> {
        if let Some(why) = &self.failed {
            return Err(ClusterError::Unavailable(why.clone()));
        }
        let r = self.send(plan).await;
        if let Err(e) = &r {
            self.step_failed(e);
        }
        r
    }

    /// One step in flight per stage: while the last stage finishes a batch, the first
    /// already computes the next.
    fn pipeline_depth(&self) -> usize {
        self.spec.plan.pp
    }

    fn submit(&mut self, plan: &StepPlan) -> Option<Pending> {
        Some(match &self.failed {
            Some(why) => Box::pin(std::future::ready(Err(ClusterError::Unavailable(why.clone())))),
            None => Box::pin(self.send(plan)),
        })
    }

    fn step_failed(&mut self, e: &ClusterError) {
        if let ClusterError::WorkerLost(why) | ClusterError::Protocol(why) = e {
            self.failed.get_or_insert_with(|| why.clone());
        }
    }
}

impl Cluster {
    /// Sends `plan` to every rank, each rank's call after that rank answered the step
    /// submitted before it, and checks every answer. With pp > 1, once the last stage has
    /// answered, the wanted rows' final hidden states go to the ranks before it that hold
    /// rows of the output projection, and for a step the engine sends alone
    /// ([`StepPlan::slice_later`]) to the last stage's too ([`HeadRows`](tpserve_types::step::HeadRows), each rank's call again in its turn), and
    /// their answers join the reply. The future owns what it needs: several may be in
    /// flight. Its error says whether the cluster failed ([`Backend::step_failed`]).
    fn send(&mut self, plan: &StepPlan) -> impl std::future::Future<Output = Result<StepReply, ClusterError>> + Send + 'static {
        let mut req = v1::StepRequest::from(plan);
        let (plan_ref, step) = (&self.spec.plan, plan.step);
        let wanted_seqs = plan.seqs.iter().filter(|w| w.logits != LogitsWanted::None).count();
        let wants_rows = wanted_seqs > 0;
        // A step the engine sends alone has nothing to overlap with: every stage's slice of
        // the output projection (the last stage's too) projects its rows in the second half,
        // all at once. Under load the last stage projects its own slice inside the step, which
        // spares every step a call (measured faster: docs/PERFORMANCE.md).
        req.slice_later = plan.slice_later && wants_rows && plan_ref.pp > 1;
        let head_ranks: Vec<usize> = self.slices.iter().filter(|&&(_, last)| req.slice_later || !last).map(|&(rank, _)| rank).collect();
        let mut request_bytes = req.encoded_len() * self.workers.len();
        let span = info_span!("step", step = plan.step, seqs = plan.seqs.len());
        let all: Vec<usize> = (0..self.workers.len()).collect();
        let turns = take_turns(&self.turns, &all);
        let (workers, timeouts, all_turns) = (self.workers.clone(), self.spec.timeouts, self.turns.clone());
        let reporter = (plan_ref.pp - 1) * plan_ref.tp;
        async move {
            let (mut outputs, mut response_bytes) = gather(&workers, &all, timeouts, req, turns).instrument(span.clone()).await?;
            let hidden = std::mem::take(&mut outputs[reporter].hidden);
            if wants_rows && !head_ranks.is_empty() {
                if hidden.is_empty() {
                    let why = format!("worker rank {reporter} ({}) reported no hidden states for the other stages' vocabulary slices", workers[reporter].addr);
                    return Err(ClusterError::Protocol(why));
                }
                let req = v1::StepRequest { step, head: Some(v1::HeadRows { of_step: step, hidden }), ..Default::default() };
                request_bytes += req.encoded_len() * head_ranks.len();
                let turns = take_turns(&all_turns, &head_ranks);
                // The step's first half already changed every rank's caches: a refusal of its
                // second half is no bad request but ranks that disagree (the cluster reloads).
                let (heads, bytes) = gather(&workers, &head_ranks, timeouts, req, turns).instrument(span.clone()).await.map_err(|e| match e {
                    ClusterError::Rejected(why) => ClusterError::Protocol(format!("the ranks refused step {step}'s head rows: {why}")),
                    e => e,
                })?;
                response_bytes += bytes;
                for h in heads {
                    // Every slice answers every sequence that wanted rows: one that did not (a
                    // worker that ignored the head rows) would leave its tokens out unnoticed.
                    if h.seqs.len() != wanted_seqs {
                        let why = format!(
                            "worker rank {} ({}) answered step {step}'s head rows for {} sequences, {wanted_seqs} wanted them",
                            h.rank,
                            workers[h.rank].addr,
                            h.seqs.len()
                        );
                        return Err(ClusterError::Protocol(why));
                    }
                    let o = &mut outputs[h.rank];
                    o.seqs = h.seqs;
                    o.compute_us += h.compute_us;
                }
            }
            for o in &outputs {
                debug!(parent: &span, rank = o.rank, compute_us = o.compute_us, comm_us = o.comm_us, "rank step");
            }
            Ok(StepReply { outputs, request_bytes, response_bytes })
        }
    }
}

/// [`fan_out`] `req` to `ranks` and checks every answer: their outputs in `ranks` order and
/// their encoded size, or why the step failed (naming the rank that explains it; a step
/// every rank refused leaves the cluster as it was).
async fn gather(
    workers: &[RemoteWorker],
    ranks: &[usize],
    timeouts: Timeouts,
    req: v1::StepRequest,
    turns: Vec<Turn>,
) -> Result<(Vec<StepOutput>, usize), ClusterError> {
    let (answers, mut errors) = fan_out(workers, ranks, timeouts, req, turns).await;
    if !errors.is_empty() {
        errors.sort_by_key(|(r, _)| *r);
        // Every rank refused the step the same way: the request was bad, the cluster is fine.
        if errors.len() == ranks.len() && errors.iter().all(|(_, s)| s.code() == Code::InvalidArgument) {
            return Err(ClusterError::Rejected(errors[0].1.message().to_string()));
        }
        let why = diagnose(workers, &errors);
        warn!(error = %why, "step failed");
        return Err(ClusterError::WorkerLost(why));
    }
    outputs(workers, ranks, answers)
}

/// One rank's place in the order of steps: its call waits for `after` (the rank answered the
/// step before), and fires `done` once it has its answer (or is dropped, which also frees the
/// next step's call).
struct Turn {
    after: Option<oneshot::Receiver<()>>,
    done: oneshot::Sender<()>,
}

/// Sends `req` to every rank of `ranks` at once (each rank's call after its [`Turn`]) and
/// gathers every answer (in `ranks` order; errors by world rank). A step without sequences (the idle probe) must be answered within
/// [`Timeouts::probe`]. While the step runs, ranks that have not answered are asked for
/// their health every [`Timeouts::health`]: one that misses [`HEALTH_MISSES`] in a row is
/// stopped or cut off, and the step fails at once, naming it. Once a rank has failed, the
/// others get one collective deadline (plus a margin) to report what they saw; a rank that
/// has not answered by then counts as failed too.
async fn fan_out(
    workers: &[RemoteWorker],
    ranks: &[usize],
    timeouts: Timeouts,
    req: v1::StepRequest,
    turns: Vec<Turn>,
) -> (Vec<v1::StepResponse>, Vec<(usize, Status)>) {
    let world = ranks.len();
    // A step with work (sequences, or head rows to project) gets the step deadline and
    // health checks; the idle probe must be answered at once.
    let works = !req.seqs.is_empty() || req.head.is_some();
    let deadline = if works { timeouts.step } else { timeouts.probe };
    let mut pending: FuturesUnordered<_> = ranks
        .iter()
        .zip(turns)
        .enumerate()
        .map(|(i, (&rank, turn))| {
            let mut c = workers[rank].client.clone();
            let mut r = Request::new(req.clone());
            r.set_timeout(deadline);
            async move {
                if let Some(after) = turn.after {
                    // An error only says the step before was dropped: the rank is free.
                    let _ = after.await;
                }
                let t = std::time::Instant::now();
                let r = tokio::time::timeout(deadline + Duration::from_millis(500), c.step(r))
                    .await
                    .unwrap_or_else(|_| Err(Status::deadline_exceeded(format!("no answer within {deadline:?}"))))
                    .map(|r| r.into_inner());
                let _ = turn.done.send(());
                debug!(rank, rpc_us = t.elapsed().as_micros() as u64, "step rpc");
                (i, r)
            }
        })
        .collect();
    let mut answers: Vec<Option<v1::StepResponse>> = vec![None; world];
    let mut errors: Vec<(usize, Status)> = Vec::new();
    let waited = timeouts.comm + Duration::from_secs(1);
    let mut grace: Option<tokio::time::Instant> = None;
    let mut misses = vec![0u32; world];
    // A rank taken for lost by its health checks: the others' answers are not awaited.
    let mut lost = None;
    let mut health = tokio::time::interval_at(tokio::time::Instant::now() + timeouts.health, timeouts.health);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'gather: loop {
        let until = grace.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        let next = tokio::select! {
            n = pending.next() => n,
            _ = tokio::time::sleep_until(until) => break,
            _ = health.tick(), if works => {
                let waiting: Vec<usize> = (0..world).filter(|&i| answers[i].is_none() && !errors.iter().any(|(e, _)| *e == ranks[i])).map(|i| ranks[i]).collect();
                for (rank, ok) in health_of(workers, timeouts.health, &waiting).await {
                    let i = ranks.iter().position(|&r| r == rank).expect("asked only ranks of this call");
                    misses[i] = if ok { 0 } else { misses[i] + 1 };
                    if misses[i] >= HEALTH_MISSES {
                        let gone = timeouts.health * (HEALTH_MISSES + 1);
                        errors.push((rank, Status::unavailable(format!("stopped answering health checks for {gone:?} while a step was running; is it stopped or partitioned?"))));
                        lost = Some(rank);
                        break 'gather;
                    }
                }
                continue;
            }
        };
        let Some((i, r)) = next else { break };
        match r {
            Ok(a) => answers[i] = Some(a),
            Err(s) => {
                grace.get_or_insert_with(|| tokio::time::Instant::now() + waited);
                errors.push((ranks[i], s));
            }
        }
    }
    for (&rank, a) in ranks.iter().zip(&answers) {
        if a.is_none() && !errors.iter().any(|(r, _)| *r == rank) {
            let status = match lost {
                // Waiting in the collective for the lost rank: a victim, not a culprit.
                Some(l) => Status::aborted(format!("its step waited on rank {l}")),
                None => Status::deadline_exceeded(format!("no answer within {waited:?} of a peer's failure; is it stopped or partitioned?")),
            };
            errors.push((rank, status));
        }
    }
    (answers.into_iter().flatten().collect(), errors)
}

/// Asks `ranks` for their health at once: (rank, answered within 90% of `every`, the
/// [`Timeouts::health`] interval).
async fn health_of(workers: &[RemoteWorker], every: Duration, ranks: &[usize]) -> Vec<(usize, bool)> {
    let within = every.mul_f32(0.9);
    let calls = ranks.iter().map(|&rank| {
        let mut c = workers[rank].client.clone();
        async move {
            let mut r = Request::new(v1::HealthRequest {});
            r.set_timeout(within);
            let ok = matches!(tokio::time::timeout(within, c.health(r)).await, Ok(Ok(_)));
            (rank, ok)
        }
    });
    futures::future::join_all(calls).await
}

/// The answers of `ranks` checked and converted, in that order, with their encoded size;
/// a malformed one fails the cluster.
fn outputs(workers: &[RemoteWorker], ranks: &[usize], answers: Vec<v1::StepResponse>) -> Result<(Vec<StepOutput>, usize), ClusterError> {
    let mut outputs = Vec::with_capacity(answers.len());
    let mut response_bytes = 0;
    for (&rank, a) in ranks.iter().zip(answers) {
        response_bytes += a.encoded_len();
        let Some(out) = StepOutput::try_from(a).ok().filter(|o| o.rank == rank) else {
            let why = format!("worker rank {rank} ({}) sent a malformed step answer", workers[rank].addr);
            return Err(ClusterError::Protocol(why));
        };
        outputs.push(out);
    }
    Ok((outputs, response_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_collective_host_is_the_host_the_worker_was_reached_at() {
        assert_eq!(host_of("127.0.0.1:5000"), "127.0.0.1");
        assert_eq!(host_of("http://worker-1.svc:5000"), "worker-1.svc");
        assert_eq!(host_of("[::1]:5000"), "[::1]");
    }
}
