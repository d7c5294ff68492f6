//! `tpserve-worker`: one rank of a cluster. A gRPC server ([`server`]) around a loaded
//! model shard and its sequences ([`shard`]) on this process's compute pool ([`local`]),
//! talking to its peers over a collective. The binary steps the same [`LocalShard`] in
//! process at tp = pp = 1.

pub mod local;
pub mod server;
pub mod shard;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tpserve_proto::auth::{CheckToken, SendToken};
use tpserve_proto::v1;

pub use local::LocalShard;
pub use server::{WorkerConfig, WorkerService};
pub use shard::{Shard, StepError};
pub use tpserve_proto::auth::{Admission, ClusterToken};
pub use tpserve_proto::tls::Tls;

/// Serves `service` on `listener` (over TLS when `tls` is set), admitting callers as
/// `admit` says (every other call is refused `UNAUTHENTICATED` before it reaches the
/// service), until the Shutdown RPC
/// notifies `shutdown` or `stop` completes (in the binary: Ctrl-C, SIGTERM, or stdin
/// closing with `--exit-with-stdin`), then shuts the server down gracefully. Meanwhile it
/// watches for a coordinator that went away ([`WorkerService::watch_coordinator`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: WorkerService,
    admit: Admission,
    tls: Option<&Tls>,
    shutdown: Arc<Notify>,
    stop: impl Future<Output = ()> + Send,
) -> Result<(), String> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = tls {
        builder = builder.tls_config(t.server()?).map_err(|e| format!("TLS: {e}"))?;
    }
    let watch = tokio::spawn(service.clone().watch_coordinator());
    let stop = async move {
        tokio::select! {
            _ = shutdown.notified() => {}
            _ = stop => {}
        }
    };
    // Steps are small messages answered at once: no Nagle delay on any accepted connection
    // (the builder's own tcp_nodelay only applies to listeners it binds itself).
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        if let Ok(c) = &conn {
            let _ = c.set_nodelay(true);
        }
        conn
    });
    let server = tpserve_proto::WorkerServer::new(service).max_decoding_message_size(tpserve_proto::MAX_MESSAGE_BYTES);
    let served = builder.add_service(InterceptedService::new(server, CheckToken::new(admit))).serve_with_incoming_shutdown(incoming, stop).await;
    watch.abort();
    served.map_err(|e| e.to_string())
}

/// Keeps this worker registered with the coordinator at `coordinator`: joins (see
/// [`join`]), then joins again whenever `service` takes its coordinator for gone, so a
/// restarted coordinator finds it. Returns only if a coordinator refuses it.
pub async fn stay_joined(service: WorkerService, coordinator: String, advertise: String, token: Option<ClusterToken>, tls: Option<Tls>) -> Result<(), String> {
    let id = worker_id();
    loop {
        let lost = service.coordinator_lost();
        tokio::pin!(lost);
        tokio::select! {
            joined = join(&coordinator, &advertise, token.as_ref(), tls.as_ref(), id, Duration::from_secs(3600)) => {
                joined?;
                tracing::info!(%coordinator, %advertise, "joined the coordinator");
                lost.await;
                tracing::info!(%coordinator, "joining the coordinator again");
            }
            // Nobody called meanwhile either: start over with a fresh connection.
            _ = &mut lost => {}
        }
    }
}

/// A random id for this process (see `JoinRequest.worker_id`).
fn worker_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish() | 1
}

/// Registers this worker (reachable at `advertise`, process id `id`) with the coordinator
/// at `coordinator`, presenting `token` (over TLS when `tls` is set), retrying with
/// back-off until it answers or `deadline` passes.
pub async fn join(coordinator: &str, advertise: &str, token: Option<&ClusterToken>, tls: Option<&Tls>, id: u64, deadline: Duration) -> Result<(), String> {
    let endpoint = tpserve_proto::tls::endpoint(coordinator, tls)?;
    let start = tokio::time::Instant::now();
    let mut wait = Duration::from_millis(100);
    loop {
        let attempt = async {
            let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
            let mut c = tpserve_proto::CoordinatorClient::with_interceptor(channel, SendToken::new(token));
            match c.join(v1::JoinRequest { worker_addr: advertise.to_string(), worker_id: id }).await {
                Ok(r) => Ok(r.into_inner()),
                // A wrong token stays wrong, a taken address stays taken: no point in retrying.
                Err(s) if matches!(s.code(), tonic::Code::Unauthenticated | tonic::Code::AlreadyExists) => {
                    Ok(v1::JoinResponse { accepted: false, message: s.message().to_string() })
                }
                Err(s) => Err(s.message().to_string()),
            }
        };
        match attempt.await {
            Ok(r) if r.accepted => return Ok(()),
            Ok(r) => return Err(format!("coordinator {coordinator} refused this worker: {}", r.message)),
            Err(e) if start.elapsed() + wait > deadline => return Err(format!("cannot join coordinator {coordinator}: {e}")),
            Err(e) => {
                tracing::debug!(error = %e, "coordinator not reachable yet");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        }
    }
}
