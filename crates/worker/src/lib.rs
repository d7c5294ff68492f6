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
use tpserve_proto::v1;

pub use local::LocalShard;
pub use server::WorkerService;
pub use shard::{Shard, StepError};

/// Serves `service` on `listener` until the Shutdown RPC notifies `shutdown` or `stop`
/// completes (in the binary: Ctrl-C, SIGTERM, or stdin closing with `--exit-with-stdin`),
/// then shuts the server down gracefully.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: WorkerService,
    shutdown: Arc<Notify>,
    stop: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
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
    tonic::transport::Server::builder()
        .add_service(tpserve_proto::WorkerServer::new(service).max_decoding_message_size(64 << 20))
        .serve_with_incoming_shutdown(incoming, stop)
        .await
}

/// Registers this worker (reachable at `advertise`) with the coordinator at `coordinator`,
/// retrying with back-off until it answers or `deadline` passes.
pub async fn join(coordinator: &str, advertise: &str, deadline: Duration) -> Result<(), String> {
    let url = if coordinator.contains("://") { coordinator.to_string() } else { format!("http://{coordinator}") };
    let start = tokio::time::Instant::now();
    let mut wait = Duration::from_millis(100);
    loop {
        let attempt = async {
            let mut c = tpserve_proto::CoordinatorClient::connect(url.clone()).await.map_err(|e| e.to_string())?;
            let r = c.join(v1::JoinRequest { worker_addr: advertise.to_string() }).await.map_err(|e| e.message().to_string())?;
            Ok::<_, String>(r.into_inner())
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
