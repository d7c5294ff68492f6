//! `tpserve worker`: a worker process that waits to be told what to load.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use tokio::sync::Notify;
use tpserve_worker::{Admission, WorkerConfig, WorkerService};

use super::auth::AuthArgs;

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// Address of the gRPC server the coordinator drives this worker through.
    #[arg(long, default_value = "0.0.0.0:50051", env = "TPSERVE_WORKER_LISTEN")]
    pub listen: String,
    /// Address peers connect to for the collective (default: the --listen host, any port).
    #[arg(long, env = "TPSERVE_COMM_LISTEN")]
    pub comm_listen: Option<String>,
    /// Register with the coordinator at this address instead of waiting to be named on its
    /// command line (how containers and Kubernetes start workers).
    #[arg(long, env = "TPSERVE_JOIN")]
    pub join: Option<String>,
    /// The address the coordinator reaches this worker at, sent with --join (default: the
    /// --listen address, with this machine's hostname when it listens on all interfaces).
    #[arg(long, env = "TPSERVE_ADVERTISE")]
    pub advertise: Option<String>,
    /// Compute threads (default: the number of available cores).
    #[arg(long, env = "TPSERVE_THREADS")]
    pub threads: Option<usize>,
    /// Where the forward passes run: cpu, cuda (GPU 0) or cuda:N. A GPU needs a binary
    /// built with `--features cuda`.
    #[arg(long, default_value = "cpu", env = "TPSERVE_DEVICE")]
    pub device: tpserve_types::device::Device,
    /// Microseconds a collective receive polls for a peer's data before it sleeps in the
    /// kernel (0: sleep at once, for machines with fewer cores than ranks' threads).
    #[arg(long, default_value_t = 100, env = "TPSERVE_COMM_SPIN_US")]
    pub comm_spin_us: u64,
    /// The only directory a coordinator's Load may name a model file in (relative names
    /// are taken inside it). Default: $TPSERVE_HOME/models, where the default model is cached.
    #[arg(long, env = "TPSERVE_MODEL_DIR")]
    pub model_dir: Option<std::path::PathBuf>,
    /// A model file this worker may load wherever it is (besides those in --model-dir).
    #[arg(long, env = "TPSERVE_MODEL")]
    pub model: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub auth: AuthArgs,
    /// Without a cluster token, accept callers from any address (not only loopback): only
    /// on a network where everyone who can reach the worker may drive it.
    #[arg(long, env = "TPSERVE_INSECURE")]
    pub insecure: bool,
    /// Seconds without any call from the coordinator after which this worker drops its
    /// shard (the coordinator is gone) and, with --join, registers again.
    #[arg(long, default_value_t = 10, env = "TPSERVE_COORDINATOR_TIMEOUT_SECS")]
    pub coordinator_timeout_secs: u64,
    /// Exit when standard input closes (set by `tpserve up` so workers never outlive it).
    #[arg(long, hide = true)]
    pub exit_with_stdin: bool,
}

pub fn run(args: WorkerArgs) -> Result<()> {
    let pool = Arc::new(super::thread_pool(args.threads)?);
    super::block_on(serve(args, pool))
}

async fn serve(args: WorkerArgs, pool: Arc<rayon::ThreadPool>) -> Result<()> {
    let token = args.auth.token()?;
    let tls = args.auth.tls()?;
    if tls.as_ref().is_some_and(|_| args.auth.tls_cert.is_none()) {
        anyhow::bail!("--tls-ca without --tls-cert: a worker serves TLS with its own certificate (--tls-cert, --tls-key)");
    }
    if args.coordinator_timeout_secs == 0 {
        anyhow::bail!("--coordinator-timeout-secs 0: give the coordinator at least a second between calls");
    }
    let listener = tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("--listen {}: cannot listen there", args.listen))?;
    let addr = listener.local_addr()?;
    let comm_listen = args.comm_listen.clone().unwrap_or_else(|| SocketAddr::new(addr.ip(), 0).to_string());
    let comm = std::net::TcpListener::bind(&comm_listen).with_context(|| format!("--comm-listen {comm_listen}: cannot listen there"))?;
    let comm_ip = comm.local_addr()?.ip();
    if token.is_none() && !args.insecure && !(addr.ip().is_loopback() && comm_ip.is_loopback()) {
        anyhow::bail!(
            "this worker listens on {addr} (collective on {comm_ip}) without a cluster token, so anyone who reaches it could drive it: \
             give it --cluster-token (or TPSERVE_CLUSTER_TOKEN / --cluster-token-file, the same on every process), \
             listen on 127.0.0.1, or pass --insecure on a network you trust"
        );
    }
    let admit = Admission::from_token(token.clone(), args.insecure);
    match &admit {
        Admission::Token(_) => tracing::info!("callers must present the cluster token"),
        Admission::LoopbackOnly => eprintln!("no cluster token: this worker accepts only loopback callers"),
        Admission::Anyone => eprintln!("warning: --insecure without a cluster token: anyone who reaches {addr} can drive this worker"),
    }
    let shutdown = Arc::new(Notify::new());
    let cfg = WorkerConfig {
        comm_spin: Duration::from_micros(args.comm_spin_us),
        token: token.clone(),
        model_dir: args.model_dir.clone().unwrap_or_else(tpserve_fetch::models_dir),
        model: args.model.clone().map(|m| std::path::absolute(&m).unwrap_or(m)),
        coordinator_timeout: Duration::from_secs(args.coordinator_timeout_secs),
        device: args.device,
    };
    let service = WorkerService::new(pool, comm, shutdown.clone(), cfg).map_err(|e| anyhow::anyhow!("cannot use --device {}: {e}", args.device))?;
    let comm_addr = service.comm_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "tpserve worker listening on {addr} (collective on {comm_addr})")?;
        tracing::info!(device = %service.device(), "computing on");
        out.flush()?;
    }
    if let Some(coordinator) = args.join.clone() {
        let advertise = match &args.advertise {
            Some(a) => a.clone(),
            None if addr.ip().is_unspecified() => format!("{}:{}", hostname(), addr.port()),
            None => addr.to_string(),
        };
        let service = service.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            if let Err(e) = tpserve_worker::stay_joined(service, coordinator, advertise, token, tls).await {
                // Refused for good (a wrong token, an address another worker has): exit, so
                // a supervisor shows the error instead of a worker that never serves.
                eprintln!("error: {e}");
                std::process::exit(2);
            }
        });
    }
    let exit_with_stdin = args.exit_with_stdin;
    let stop = async move {
        let stdin_closed = async {
            if exit_with_stdin {
                let mut buf = [0u8; 64];
                use tokio::io::AsyncReadExt;
                let mut stdin = tokio::io::stdin();
                while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
            } else {
                std::future::pending::<()>().await
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate() => {}
            _ = stdin_closed => {}
        }
    };
    tpserve_worker::serve(listener, service, admit, tls.as_ref(), shutdown, stop).await.map_err(|e| anyhow!("the worker's server failed: {e}"))?;
    Ok(())
}

/// Completes on SIGTERM (how containers are stopped).
async fn terminate() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "localhost".into())
}
