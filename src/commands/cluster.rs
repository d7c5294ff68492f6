//! What `up`, `coordinator` and `generate --tp/--pp` share: starting local worker processes,
//! loading a plan onto workers with a progress bar per worker, printing the plan, and the
//! in-process backend that runs tp = pp = 1 without any worker.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tpserve_coordinator::{Backend, Cluster, ClusterError, StepReply, Timeouts};
use tpserve_model::model::model_shape;
use tpserve_scheduler::SchedulerConfig;
use tpserve_types::kv::{KvLayout, KvSizing};
use tpserve_types::plan::Plan;
use tpserve_types::step::StepPlan;
use tpserve_worker::Shard;

use super::Loaded;

/// How the model is split.
#[derive(Args, Debug, Clone)]
pub struct ParallelArgs {
    /// Tensor-parallel ranks per pipeline stage (attention heads, FFN columns and the
    /// vocabulary are split over them). Default 1; for `up`, as many as there are cores
    /// (the largest the model allows).
    #[arg(long, env = "TPSERVE_TP")]
    pub tp: Option<usize>,
    /// Pipeline stages (contiguous layer ranges balanced by bytes).
    #[arg(long, default_value_t = 1, env = "TPSERVE_PP")]
    pub pp: usize,
    /// Deadline of every collective wait on the workers, in milliseconds: a dead or silent
    /// peer becomes an error within it.
    #[arg(long, default_value_t = 10_000, env = "TPSERVE_COMM_TIMEOUT_MS")]
    pub comm_timeout_ms: u64,
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
        Timeouts { comm: Duration::from_millis(self.comm_timeout_ms.max(1)), ..Timeouts::default() }
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
    pub fn kv_layout(&self, cfg: &tpserve_model::config::ModelConfig) -> Result<KvLayout> {
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
        Ok(kv_layout(cfg, KvSizing { block_size: self.block_size, tokens, max_seqs: self.max_num_seqs, max_chunk: self.max_num_batched_tokens }))
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

/// `cfg`'s layers grouped by attention window and sized by `sizing`.
pub fn kv_layout(cfg: &tpserve_model::config::ModelConfig, sizing: KvSizing) -> KvLayout {
    KvLayout::new(&(0..cfg.n_layers).map(|l| cfg.window(l)).collect::<Vec<_>>(), sizing)
}

/// One line on the KV cache: capacity, and what the sliding windows save.
pub fn describe_kv(kv: &KvLayout, cfg: &tpserve_model::config::ModelConfig, kv_dim: usize) -> String {
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

/// Worker processes started by this process on loopback; killed when dropped.
pub struct LocalWorkers {
    pub children: Vec<Child>,
    pub addrs: Vec<String>,
}

impl LocalWorkers {
    /// Starts `n` `tpserve worker` processes on 127.0.0.1 with `threads` compute threads each
    /// and waits for each to say where it listens. They exit when this process's end of
    /// their standard input closes, so they never outlive it.
    pub async fn spawn(n: usize, threads: usize) -> Result<Self> {
        let exe = std::env::current_exe().context("cannot find the tpserve executable to start workers")?;
        let mut children = Vec::with_capacity(n);
        let mut addrs = Vec::with_capacity(n);
        for rank in 0..n {
            // Workers inherit TPSERVE_COMM_SPIN_US and the rest of the environment.
            let mut child = Command::new(&exe)
                .args(["worker", "--listen", "127.0.0.1:0", "--threads", &threads.to_string(), "--exit-with-stdin"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                // Their own process group: a terminal's Ctrl-C reaches only this process,
                // which then stops the workers in order (their stdin closes).
                .process_group(0)
                .spawn()
                .with_context(|| format!("cannot start worker {rank} ({})", exe.display()))?;
            let stdout = child.stdout.take().expect("stdout is piped");
            let mut lines = BufReader::new(stdout).lines();
            let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .map_err(|_| anyhow!("worker {rank} did not start within 30 s"))?
                .context("cannot read the worker's address")?
                .ok_or_else(|| anyhow!("worker {rank} exited before it started listening"))?;
            let addr = parse_listening(&line).ok_or_else(|| anyhow!("worker {rank} said {line:?}, not where it listens"))?;
            tracing::info!(rank, pid = child.id(), %addr, "started worker");
            eprintln!("worker {rank}: pid {} listening on {addr}", child.id().unwrap_or(0));
            addrs.push(addr);
            children.push(child);
        }
        Ok(Self { children, addrs })
    }

    /// Waits up to `grace` (in all) for every worker to exit, then kills what is left.
    pub async fn stop(mut self, grace: Duration) {
        for c in &mut self.children {
            // Closing stdin asks --exit-with-stdin workers to stop.
            drop(c.stdin.take());
        }
        let deadline = tokio::time::Instant::now() + grace;
        for c in &mut self.children {
            if tokio::time::timeout_at(deadline, c.wait()).await.is_err() {
                let _ = c.kill().await;
            }
        }
    }
}

/// The address in a worker's first line, `tpserve worker listening on ADDR ...`.
pub fn parse_listening(line: &str) -> Option<String> {
    let rest = line.split_once("listening on ")?.1;
    Some(rest.split_whitespace().next()?.to_string())
}

/// Default compute threads per local worker: the cores shared out, at least one each.
pub fn threads_per_worker(explicit: Option<usize>, world: usize) -> Result<usize> {
    match explicit {
        Some(0) => bail!("--threads 0: need at least one thread"),
        Some(n) => Ok(n),
        None => {
            let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            Ok((cores / world.max(1)).max(1))
        }
    }
}

/// Connects to `addrs` and loads `plan` onto them with a progress bar per worker, then
/// prints the plan with each rank's memory. `model_path` is the file as workers see it.
pub async fn load_cluster(addrs: &[String], plan: Plan, loaded: &Loaded, model_path: &str, timeouts: Timeouts, kv: KvLayout) -> Result<Cluster> {
    let workers = futures_try_join(addrs.iter().map(|a| tpserve_coordinator::cluster::connect(a, timeouts.connect))).await?;
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>8} {bar:30} {bytes:>10}/{total_bytes:<10} {msg}").expect("valid template");
    let shards = plan.shards();
    let pbs: Vec<ProgressBar> = shards
        .iter()
        .map(|s| {
            let pb = bars.add(ProgressBar::new(s.bytes.max(1)));
            pb.set_style(style.clone());
            pb.set_prefix(format!("rank {}", s.rank));
            pb
        })
        .collect();
    let ctx = loaded.config()?.context_len;
    let model_bytes = loaded.gguf.file_len() as u64;
    let cluster = Cluster::load(workers, plan, ctx, kv, model_path, model_bytes, timeouts, |rank, p| {
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
    let cluster = cluster.map_err(anyhow::Error::from)?;
    eprint!("{}", describe(&cluster));
    Ok(cluster)
}

/// Runs every future, waits for all of them, and fails with every error if any failed.
async fn futures_try_join<T>(futs: impl Iterator<Item = impl std::future::Future<Output = Result<T, ClusterError>>>) -> Result<Vec<T>> {
    let results = futures::future::join_all(futs).await;
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(v) => ok.push(v),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(ok)
}

/// The plan as loaded: one line per rank with its slices, weights and peak memory.
pub fn describe(c: &Cluster) -> String {
    let p = c.plan();
    let n = p.world();
    let mut s = format!("plan: tp = {}, pp = {} ({n} worker{})\n", p.tp, p.pp, if n == 1 { "" } else { "s" });
    for l in &c.loaded {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let plural = if l.threads == 1 { "" } else { "s" };
        s += &format!(
            "  rank {} @ {}: {}; weights {:.1} MiB, KV cache {:.1} MiB, peak RSS {:.1} MiB, {} thread{plural}\n",
            l.shard.rank,
            l.addr,
            l.shard,
            mib(l.shard.bytes),
            mib(l.kv_bytes),
            mib(l.peak_rss_bytes),
            l.threads
        );
    }
    s
}

/// tp = pp = 1 in this process: the whole model as one shard, no network.
pub struct InProcess {
    shard: Arc<Mutex<Shard>>,
    pool: Arc<rayon::ThreadPool>,
    context_len: usize,
    kv: KvLayout,
}

impl InProcess {
    /// Loads the single rank of `plan` (tp = pp = 1).
    pub fn load(loaded: &Loaded, plan: &Plan, pool: Arc<rayon::ThreadPool>, kv: KvLayout) -> Result<Self> {
        if plan.world() != 1 {
            bail!("the in-process backend runs tp = pp = 1, not a world of {}", plan.world());
        }
        let shard = pool
            .install(|| Shard::load(&loaded.gguf, &plan.shard(0), Arc::new(tpserve_comm::Local), None, &kv))
            .context("cannot load the model weights")?;
        // As workers do: read the weights now, not on the first request.
        shard.model().prefault(|_, _| {});
        let context_len = shard.model().config().context_len;
        Ok(Self { shard: Arc::new(Mutex::new(shard)), pool, context_len, kv })
    }
}

impl Backend for InProcess {
    fn context_len(&self) -> usize {
        self.context_len
    }

    fn kv_layout(&self) -> &KvLayout {
        &self.kv
    }

    async fn step(&mut self, plan: &StepPlan) -> Result<StepReply, ClusterError> {
        let (shard, plan) = (self.shard.clone(), plan.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pool.spawn(move || {
            let mut guard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let _ = tx.send(guard.step(&plan));
        });
        let out = rx.await.map_err(|_| ClusterError::Protocol("the step's compute thread panicked".into()))?;
        match out {
            Ok(o) => Ok(StepReply { outputs: vec![o], request_bytes: 0, response_bytes: 0 }),
            Err(e @ tpserve_worker::StepError::Invalid { .. }) => Err(ClusterError::Rejected(e.to_string())),
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
    pub async fn start(loaded: &Loaded, plan: Plan, threads: Option<usize>, parallel: &ParallelArgs, kv: KvLayout) -> Result<Self> {
        if plan.world() == 1 {
            let pool = Arc::new(super::thread_pool(threads)?);
            return Ok(Self::InProcess(InProcess::load(loaded, &plan, pool, kv)?));
        }
        let threads = threads_per_worker(threads, plan.world())?;
        let workers = LocalWorkers::spawn(plan.world(), threads).await?;
        let model_path = worker_model_path(loaded.explicit.then_some(loaded.path.as_path()))?;
        match load_cluster(&workers.addrs, plan, loaded, &model_path, parallel.timeouts(), kv).await {
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
}
