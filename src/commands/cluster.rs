//! What `up`, `coordinator`, `generate` and `eval` share: the parallelism and scheduling
//! flags, loading a plan onto workers with a progress bar per worker, printing the plan and
//! the KV cache, and where a one-off command runs ([`LocalBackend`]: in this process at
//! tp = pp = 1, else on local worker processes).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tpserve_coordinator::{cluster, Backend, Cluster, ClusterError, ClusterSpec, ClusterToken, LoadProgress, Pending, StepReply, Timeouts, Tls};

use super::auth::random_token;
use tpserve_model::config::ModelConfig;
use tpserve_model::device::DeviceOps;
use tpserve_model::model::model_shape;
use tpserve_scheduler::SchedulerConfig;
use tpserve_types::device::{CollectiveChoice, Device};
use tpserve_types::kv::{KvLayout, KvSizing};
use tpserve_types::plan::Plan;
use tpserve_types::step::StepPlan;
use tpserve_worker::{LocalShard, StepError};

use super::local_workers::{threads_per_worker, LocalWorkers};
use super::Loaded;

/// How the model is split.
#[derive(Args, Debug, Clone)]
pub struct ParallelArgs {
    /// Tensor-parallel ranks per pipeline stage (attention heads, FFN columns and the
    /// vocabulary are split over them). Default 1; for `up`, as many as there are cores
    /// (the largest the model allows).
    #[arg(long, env = "TPSERVE_TP")]
    pub tp: Option<usize>,
    /// Pipeline stages (contiguous layer ranges balanced by a token's work; with pp > 1 they compute batches of their own at once).
    #[arg(long, default_value_t = 1, env = "TPSERVE_PP")]
    pub pp: usize,
    /// Deadline of every collective wait on the workers, in milliseconds: a dead or silent
    /// peer becomes an error within it.
    #[arg(long, default_value_t = 10_000, env = "TPSERVE_COMM_TIMEOUT_MS")]
    pub comm_timeout_ms: u64,
    /// Seconds to keep trying to reach the workers at start-up (they may still be starting).
    #[arg(long, default_value_t = 30, env = "TPSERVE_CONNECT_TIMEOUT_SECS")]
    pub connect_timeout_secs: u64,
    /// How ranks exchange activations: auto (NCCL when every rank has a GPU of its own, TCP
    /// otherwise), tcp, or nccl (refused where it cannot work).
    #[arg(long, default_value = "auto", env = "TPSERVE_COLLECTIVE")]
    pub collective: CollectiveChoice,
}

/// Where the ranks this command runs itself compute (`up`, `generate`, `eval`; the workers
/// of `tpserve coordinator` say so with their own `--device`).
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Where the forward passes run: cpu, cuda (GPU 0) or cuda:N; a comma-separated list
    /// gives rank i the i-th (e.g. cuda:0,cuda:1). GPUs need a binary built with
    /// `--features cuda`.
    #[arg(long, default_value = "cpu", value_delimiter = ',', env = "TPSERVE_DEVICE")]
    pub device: Vec<Device>,
}

impl DeviceArgs {
    /// Every world rank's device (`--device`: one for all, or one per rank), or why the
    /// list does not fit the plan.
    pub fn devices(&self, world: usize) -> Result<Vec<Device>> {
        match self.device.as_slice() {
            [] => Ok(vec![Device::Cpu; world]),
            [one] => Ok(vec![*one; world]),
            list if list.len() == world => Ok(list.to_vec()),
            list => bail!("--device lists {} devices for {world} ranks: give one for all, or one per rank", list.len()),
        }
    }
}

impl ParallelArgs {
    /// Checks tp and pp against the model: an impossible plan is refused here, with what
    /// would work, before any worker is started.
    pub fn plan(&self, loaded: &Loaded) -> Result<Plan> {
        let shape = model_shape(&loaded.gguf).context("cannot read the model's shape")?;
        let tp = self.tp.unwrap_or(1);
        Plan::new(shape, tp, self.pp).map_err(|e| anyhow!("--tp {tp} --pp {}: {e}", self.pp))
    }

    /// Like [`ParallelArgs::plan`], but without --tp the largest tp the model allows within
    /// the machine's cores (one compute thread per worker at least).
    pub fn plan_for_machine(&self, loaded: &Loaded) -> Result<Plan> {
        if self.tp.is_some() {
            return self.plan(loaded);
        }
        let shape = model_shape(&loaded.gguf).context("cannot read the model's shape")?;
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let fits = (1..=(cores / self.pp.max(1)).max(1)).rev().find_map(|tp| Plan::new(shape.clone(), tp, self.pp).ok());
        match fits {
            Some(p) => Ok(p),
            None => self.plan(loaded),
        }
    }

    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            comm: Duration::from_millis(self.comm_timeout_ms.max(1)),
            connect: Duration::from_secs(self.connect_timeout_secs.max(1)),
            ..Timeouts::default()
        }
    }
}

/// How requests are scheduled and how big the paged KV cache is.
#[derive(Args, Debug, Clone)]
pub struct ServingArgs {
    /// Positions the KV cache holds per full-attention layer, over all sequences (default:
    /// the model's context length). Sliding-window layers hold only what their windows need.
    #[arg(long, env = "TPSERVE_KV_CACHE_TOKENS")]
    pub kv_cache_tokens: Option<usize>,
    /// Positions per KV cache block.
    #[arg(long, default_value_t = 16, env = "TPSERVE_BLOCK_SIZE")]
    pub block_size: usize,
    /// Most sequences in one step.
    #[arg(long, default_value_t = 32, env = "TPSERVE_MAX_NUM_SEQS")]
    pub max_num_seqs: usize,
    /// Most new tokens in one step (decode tokens first, then prefill chunks).
    #[arg(long, default_value_t = 512, env = "TPSERVE_MAX_NUM_BATCHED_TOKENS")]
    pub max_num_batched_tokens: usize,
    /// Most requests waiting to start; more get 429 Too Many Requests.
    #[arg(long, default_value_t = 256, env = "TPSERVE_MAX_WAITING")]
    pub max_waiting: usize,
    /// Do not reuse the KV blocks of earlier requests with the same prompt prefix.
    #[arg(long)]
    pub no_prefix_caching: bool,
}

impl ServingArgs {
    /// The KV cache layout for `cfg`, checked.
    pub fn kv_layout(&self, cfg: &ModelConfig) -> Result<KvLayout> {
        if self.block_size == 0 {
            bail!("--block-size 0: must be at least 1");
        }
        if self.max_num_seqs == 0 {
            bail!("--max-num-seqs 0: must be at least 1");
        }
        if self.max_num_batched_tokens == 0 {
            bail!("--max-num-batched-tokens 0: must be at least 1");
        }
        let tokens = self.kv_cache_tokens.unwrap_or(cfg.context_len);
        if tokens < self.block_size {
            bail!("--kv-cache-tokens {tokens}: must hold at least one block of {} positions", self.block_size);
        }
        Ok(cfg.kv_layout(KvSizing { block_size: self.block_size, tokens, max_seqs: self.max_num_seqs, max_chunk: self.max_num_batched_tokens }))
    }

    /// The scheduler's limits over `kv`.
    pub fn scheduler(&self, kv: KvLayout, context_len: usize) -> SchedulerConfig {
        SchedulerConfig {
            kv,
            max_num_seqs: self.max_num_seqs,
            token_budget: self.max_num_batched_tokens,
            max_waiting: self.max_waiting,
            context_len,
            prefix_caching: !self.no_prefix_caching,
        }
    }
}

/// One line on the KV cache: capacity, and what the sliding windows save.
pub fn describe_kv(kv: &KvLayout, cfg: &ModelConfig, kv_dim: usize) -> String {
    let all = 0..cfg.n_layers;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let (with, without) = (kv.bytes(&all, kv_dim), kv.bytes_without_windows(&all, kv_dim));
    let groups: Vec<String> = kv
        .groups
        .iter()
        .map(|g| match g.window {
            None => format!("{} full-attention layers x {} blocks", g.layers.len(), g.blocks),
            Some(w) => format!("{} window-{w} layers x {} blocks", g.layers.len(), g.blocks),
        })
        .collect();
    format!(
        "kv cache: {} tokens in blocks of {} ({}); {:.1} MiB per model replica, {:.1} MiB if every layer kept the full history\n",
        kv.token_capacity(),
        kv.block_size,
        groups.join(", "),
        mib(with),
        mib(without)
    )
}

/// What to load on the workers: `plan` of the model `loaded`, which the workers see at
/// `model_path` ("" = their cached default model), with the KV cache `kv`.
pub fn cluster_spec(
    plan: Plan,
    loaded: &Loaded,
    model_path: &str,
    parallel: &ParallelArgs,
    kv: KvLayout,
    token: Option<ClusterToken>,
    tls: Option<Tls>,
) -> Result<ClusterSpec> {
    Ok(ClusterSpec {
        plan,
        context_len: loaded.config()?.context_len,
        kv,
        model_path: model_path.into(),
        model_bytes: loaded.gguf.file_len() as u64,
        timeouts: parallel.timeouts(),
        token,
        tls,
        collective: parallel.collective,
    })
}

/// Connects to `addrs` and loads `spec` onto them with a progress bar per worker, then
/// prints the plan with each rank's memory.
pub async fn load_cluster(addrs: &[String], spec: ClusterSpec) -> Result<Cluster> {
    let workers = cluster::connect_all(addrs, spec.timeouts.connect, spec.token.as_ref(), spec.tls.as_ref()).await?;
    let plan = &spec.plan;
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>8} {bar:30} {bytes:>10}/{total_bytes:<10} {msg}").expect("valid template");
    let pbs: Vec<ProgressBar> = plan
        .shards()
        .iter()
        .map(|s| {
            let pb = bars.add(ProgressBar::new(s.bytes.max(1)));
            pb.set_style(style.clone());
            pb.set_prefix(format!("rank {}", s.rank));
            pb
        })
        .collect();
    let cluster = Cluster::load(workers, spec.clone(), |rank, p: &LoadProgress| {
        let pb = &pbs[rank];
        pb.set_length(p.bytes_total.max(1));
        pb.set_position(p.bytes_done);
        pb.set_message(p.phase.clone());
        if p.done {
            pb.finish_with_message("ready");
        }
    })
    .await;
    for pb in &pbs {
        pb.finish_and_clear();
    }
    let cluster = cluster?;
    eprint!("{}", describe(&cluster));
    Ok(cluster)
}

/// The plan as loaded: the collective, then one line per rank with its device, slices,
/// weights and peak memory.
pub fn describe(c: &Cluster) -> String {
    let p = c.plan();
    let n = p.world();
    let collective = c.loaded.first().map_or("tcp", |l| l.collective.as_str());
    let mut s = format!("plan: tp = {}, pp = {} ({n} worker{}, collective {collective})\n", p.tp, p.pp, if n == 1 { "" } else { "s" });
    for l in &c.loaded {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let plural = if l.threads == 1 { "" } else { "s" };
        s += &format!(
            "  rank {} @ {} on {}: {}; weights {:.1} MiB (+{:.1} MiB repacked), KV cache {:.1} MiB, peak RSS {:.1} MiB, {} thread{plural}\n",
            l.shard.rank,
            l.addr,
            l.device,
            l.shard,
            mib(l.shard.bytes),
            mib(l.repacked_bytes),
            mib(l.kv_bytes),
            mib(l.peak_rss_bytes),
            l.threads
        );
    }
    s
}

/// tp = pp = 1 in this process: the worker's own [`LocalShard`] stepped directly, no
/// network. Only the error mapping lives here; the step is the worker crate's.
pub struct InProcess {
    shard: LocalShard,
    context_len: usize,
    kv: KvLayout,
}

impl Backend for InProcess {
    fn context_len(&self) -> usize {
        self.context_len
    }

    fn kv_layout(&self) -> &KvLayout {
        &self.kv
    }

    async fn step(&mut self, plan: &StepPlan) -> Result<StepReply, ClusterError> {
        match self.shard.step(plan.clone()).await {
            Ok(o) => Ok(StepReply { outputs: vec![o], request_bytes: 0, response_bytes: 0 }),
            Err(e @ StepError::Invalid { .. }) => Err(ClusterError::Rejected(e.to_string())),
            Err(e) => Err(ClusterError::WorkerLost(e.to_string())),
        }
    }
}

/// The model path to give workers: the one the user named, or "" for each worker's own
/// cached default model.
pub fn worker_model_path(explicit: Option<&Path>) -> Result<String> {
    match explicit {
        Some(p) => {
            let abs = std::fs::canonicalize(p).with_context(|| format!("--model {}: no such file", p.display()))?;
            Ok(abs.to_string_lossy().into_owned())
        }
        None => Ok(String::new()),
    }
}

/// Where a one-off command (`generate`, `eval`) runs: in this process at tp = pp = 1, else on
/// tp x pp worker processes started on loopback for it.
pub enum LocalBackend {
    InProcess(InProcess),
    Workers(Box<(Cluster, LocalWorkers)>),
}

impl LocalBackend {
    /// Loads `plan` with the KV cache `kv`: here, or on workers with `threads` threads each
    /// (default: the cores shared out).
    pub async fn start(loaded: &Loaded, plan: Plan, threads: Option<usize>, parallel: &ParallelArgs, devices: &DeviceArgs, kv: KvLayout) -> Result<Self> {
        if plan.world() == 1 {
            let pool = Arc::new(super::thread_pool(threads)?);
            let device = devices.devices(1)?[0];
            let ops = DeviceOps::open(device).with_context(|| format!("cannot use --device {device}"))?;
            let shard = LocalShard::load_whole(&ops, &loaded.gguf, &kv, pool).context("cannot load the model weights")?;
            return Ok(Self::InProcess(InProcess { shard, context_len: loaded.config()?.context_len, kv }));
        }
        let threads = threads_per_worker(threads, plan.world())?;
        let model_path = worker_model_path(loaded.explicit.then_some(loaded.path.as_path()))?;
        let token = random_token();
        let workers = LocalWorkers::spawn(&devices.devices(plan.world())?, threads, &model_path, &token).await?;
        let spec = cluster_spec(plan, loaded, &model_path, parallel, kv, Some(token), None)?;
        match load_cluster(&workers.addrs, spec).await {
            Ok(c) => Ok(Self::Workers(Box::new((c, workers)))),
            Err(e) => {
                workers.stop(Duration::from_secs(5)).await;
                Err(e)
            }
        }
    }

    /// Stops the workers, if any.
    pub async fn stop(self) {
        if let Self::Workers(b) = self {
            let (c, w) = *b;
            c.shutdown().await;
            w.stop(Duration::from_secs(5)).await;
        }
    }
}

impl Backend for LocalBackend {
    fn context_len(&self) -> usize {
        match self {
            Self::InProcess(b) => b.context_len(),
            Self::Workers(b) => b.0.context_len(),
        }
    }

    fn kv_layout(&self) -> &KvLayout {
        match self {
            Self::InProcess(b) => b.kv_layout(),
            Self::Workers(b) => b.0.kv_layout(),
        }
    }

    async fn step(&mut self, plan: &StepPlan) -> Result<StepReply, ClusterError> {
        match self {
            Self::InProcess(b) => b.step(plan).await,
            Self::Workers(b) => b.0.step(plan).await,
        }
    }

    async fn recover(&mut self) -> Result<(), ClusterError> {
        match self {
            Self::InProcess(_) => Ok(()),
            Self::Workers(b) => b.0.recover().await,
        }
    }

    fn pipeline_depth(&self) -> usize {
        match self {
            Self::InProcess(b) => b.pipeline_depth(),
            Self::Workers(b) => b.0.pipeline_depth(),
        }
    }

    fn submit(&mut self, plan: &StepPlan) -> Option<Pending> {
        match self {
            Self::InProcess(b) => b.submit(plan),
            Self::Workers(b) => b.0.submit(plan),
        }
    }

    fn step_failed(&mut self, e: &ClusterError) {
        match self {
            Self::InProcess(b) => b.step_failed(e),
            Self::Workers(b) => b.0.step_failed(e),
        }
    }
}
