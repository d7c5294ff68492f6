//! The coordinator's own gRPC service, for workers that register themselves
//! (`tpserve worker --join`), as containers and Kubernetes pods start them. Workers get
//! world ranks in the order they join.

use tokio::sync::{mpsc, Mutex};
use tonic::{Request, Response, Status};
use tpserve_proto::v1;
use tracing::info;

use crate::error::ClusterError;

/// Accepts joins until `wanted` workers have come.
pub struct JoinService {
    state: Mutex<JoinState>,
}

struct JoinState {
    joined: Vec<String>,
    wanted: usize,
    tx: mpsc::Sender<String>,
}

impl JoinService {
    /// A service that passes each new worker address to the receiver.
    pub fn new(wanted: usize) -> (Self, mpsc::Receiver<String>) {
        let (tx, rx) = mpsc::channel(wanted.max(1));
        (Self { state: Mutex::new(JoinState { joined: Vec::new(), wanted, tx }) }, rx)
    }
}

/// Serves the join service on `listener` until `n` workers have joined, calling
/// `on_join(rank, addr)` as each comes; returns their addresses in joining order. Then it
/// stops listening, so a late joiner's retries fail with an error that names this
/// coordinator.
pub async fn wait_for_joins(listener: tokio::net::TcpListener, n: usize, mut on_join: impl FnMut(usize, &str)) -> Result<Vec<String>, ClusterError> {
    let (service, mut rx) = JoinService::new(n);
    let (stop_tx, mut stop_rx) = mpsc::channel::<()>(1);
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(tpserve_proto::CoordinatorServer::new(service))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async move {
                stop_rx.recv().await;
            })
            .await
    });
    let mut addrs = Vec::with_capacity(n);
    while addrs.len() < n {
        match rx.recv().await {
            Some(a) => {
                on_join(addrs.len(), &a);
                addrs.push(a);
            }
            None => return Err(ClusterError::Plan("the join service stopped before every worker joined".into())),
        }
    }
    let _ = stop_tx.send(()).await;
    let _ = server.await;
    Ok(addrs)
}

#[tonic::async_trait]
impl tpserve_proto::Coordinator for JoinService {
    async fn join(&self, req: Request<v1::JoinRequest>) -> Result<Response<v1::JoinResponse>, Status> {
        let addr = req.into_inner().worker_addr;
        if addr.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
            return Err(Status::invalid_argument(format!("worker_addr {addr:?} is not host:port")));
        }
        let mut st = self.state.lock().await;
        if st.joined.contains(&addr) {
            return Ok(Response::new(v1::JoinResponse { accepted: true, message: format!("{addr} had already joined") }));
        }
        if st.joined.len() >= st.wanted {
            return Ok(Response::new(v1::JoinResponse { accepted: false, message: format!("the cluster already has its {} workers", st.wanted) }));
        }
        st.joined.push(addr.clone());
        info!(worker = %addr, rank = st.joined.len() - 1, "worker joined");
        st.tx.send(addr.clone()).await.map_err(|_| Status::unavailable("the coordinator is shutting down"))?;
        Ok(Response::new(v1::JoinResponse { accepted: true, message: format!("joined as rank {}", st.joined.len() - 1) }))
    }
}
