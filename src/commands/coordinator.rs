//! `tpserve coordinator` (drive workers that run elsewhere) and `tpserve up` (start the
//! workers here too): plan, load with progress, then serve requests.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::auth::{random_token, AuthArgs};
use super::cluster::{cluster_spec, describe_kv, load_cluster, worker_model_path, DeviceArgs, ParallelArgs, ServingArgs};
use super::local_workers::{threads_per_worker, LocalWorkers};
use super::serve::{serve_http, serve_lines, ServeArgs};
use super::Loaded;
use crate::ModelArgs;

#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    /// gRPC addresses (host:port) of the workers, in world-rank order: rank r is pipeline
    /// stage r / tp, tensor-parallel rank r % tp.
    #[arg(long, value_delimiter = ',', env = "TPSERVE_WORKERS", required_unless_present = "join_listen")]
    pub workers: Vec<String>,
    /// Instead of --workers: listen here for tp x pp workers started with `--join`; ranks
    /// follow the order they join in.
    #[arg(long, conflicts_with = "workers", env = "TPSERVE_JOIN_LISTEN")]
    pub join_listen: Option<String>,
    /// The model file's path on the workers' machines (default: the --model path, or each
    /// worker's cached default model when --model is not given).
    #[arg(long, env = "TPSERVE_WORKER_MODEL")]
    pub worker_model: Option<String>,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub parallel: ParallelArgs,
    #[command(flatten)]
    pub serving: ServingArgs,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    pub parallel: ParallelArgs,
    #[command(flatten)]
    pub devices: DeviceArgs,
    #[command(flatten)]
    pub serving: ServingArgs,
    #[command(flatten)]
    pub serve: ServeArgs,
    /// `--threads` is per worker here (default: the cores shared out among the workers).
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Drives workers that run elsewhere. They outlive it: on exit it leaves them running,
/// and they drop their shards and wait for the next coordinator (`--join` ones register
/// with it again).
pub fn run_coordinator(args: CoordinatorArgs) -> Result<()> {
    let loaded = Loaded::open(&args.model)?;
    let plan = args.parallel.plan(&loaded)?;
    let kv = kv_for(&loaded, &args.serving)?;
    let model_path = match &args.worker_model {
        Some(p) => p.clone(),
        None => worker_model_path(args.model.model.as_deref())?,
    };
    let token = args.auth.token()?;
    let tls = args.auth.tls()?;
    if token.is_none() {
        eprintln!("no cluster token: only workers without one, on loopback, will accept this coordinator (see --cluster-token)");
    }
    let world = plan.world();
    if args.join_listen.is_none() && args.workers.len() != world {
        bail!("--tp {} --pp {} needs {world} workers, --workers names {}", plan.tp, plan.pp, args.workers.len());
    }
    let spec = cluster_spec(plan, &loaded, &model_path, &args.parallel, kv.clone(), token.clone(), tls.clone())?;
    super::block_on(async {
        // The join service runs for the coordinator's whole life: workers that come back
        // register again, and spares wait for a lost rank. HTTP is up meanwhile (/ready 503).
        let joins = match &args.join_listen {
            Some(listen) => {
                let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("--join-listen {listen}: cannot listen there"))?;
                eprintln!("waiting for {world} workers to join at {}", listener.local_addr()?);
                let registry = tpserve_coordinator::JoinRegistry::new(world);
                let admit = tpserve_coordinator::Admission::from_token(token.clone(), false);
                // The join service serves TLS when this coordinator has a certificate.
                let join_tls = tls.clone().filter(|_| args.auth.tls_cert.is_some());
                tpserve_coordinator::join::serve_joins(listener, registry.clone(), admit, join_tls)?;
                Some(registry)
            }
            None => None,
        };
        let load = async {
            let addrs = match &joins {
                Some(r) => r.wait_full(|rank, addr| eprintln!("worker {rank} joined: {addr}")).await,
                None => args.workers.clone(),
            };
            let cluster = load_cluster(&addrs, spec).await?;
            Ok(match joins {
                Some(r) => cluster.with_joins(r),
                None => cluster,
            })
        };
        serve(load, kv, &loaded, &args.serve, &args.serving, false).await
    })
}

pub fn run_up(args: UpArgs) -> Result<()> {
    let loaded = Loaded::open(&args.model)?;
    let plan = args.parallel.plan_for_machine(&loaded)?;
    let threads = threads_per_worker(args.model.threads, plan.world())?;
    let model_path = worker_model_path(args.model.model.as_deref())?;
    let kv = kv_for(&loaded, &args.serving)?;
    // The workers started here accept only this process: a fresh random token.
    let token = random_token();
    let spec = cluster_spec(plan, &loaded, &model_path, &args.parallel, kv.clone(), Some(token.clone()), None)?;
    super::block_on(async {
        let workers = LocalWorkers::spawn(&args.devices.devices(spec.plan.world())?, threads, &model_path, &token).await?;
        let result = async {
            let load = load_cluster(&workers.addrs, spec);
            serve(load, kv, &loaded, &args.serve, &args.serving, true).await
        }
        .await;
        workers.stop(Duration::from_secs(5)).await;
        result
    })
}

/// The KV cache layout from the flags, printed with what it costs.
fn kv_for(loaded: &Loaded, serving: &ServingArgs) -> Result<tpserve_types::kv::KvLayout> {
    let cfg = loaded.config()?;
    let kv = serving.kv_layout(&cfg)?;
    eprint!("{}", describe_kv(&kv, &cfg, cfg.n_kv_heads * cfg.head_dim));
    Ok(kv)
}

/// Serves the cluster `load` gives (HTTP, or JSON lines with --stdin), then, if
/// `stop_workers` (they were started here), asks every worker to exit.
async fn serve(
    load: impl std::future::Future<Output = Result<tpserve_coordinator::Cluster>>,
    kv: tpserve_types::kv::KvLayout,
    loaded: &Loaded,
    args: &ServeArgs,
    serving: &ServingArgs,
    stop_workers: bool,
) -> Result<()> {
    if args.stdin {
        let mut cluster = load.await?;
        let served = serve_lines(&mut cluster, &loaded.tokenizer).await;
        if stop_workers {
            cluster.shutdown().await;
        }
        return served;
    }
    if !stop_workers {
        return serve_http(load, kv, loaded, args, serving).await;
    }
    // The HTTP server owns the cluster once loaded; keep what is needed to stop its workers.
    let workers = std::sync::Mutex::new(None);
    let load = async {
        let cluster = load.await?;
        *workers.lock().unwrap_or_else(|p| p.into_inner()) = Some(cluster.workers_handle());
        Ok(cluster)
    };
    let served = serve_http(load, kv, loaded, args, serving).await;
    let handle = workers.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(w) = handle {
        w.shutdown().await;
    }
    served
}
