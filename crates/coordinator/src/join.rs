//! The coordinator's own gRPC service, for workers that register themselves
//! (`tpserve worker --join`), as containers and Kubernetes pods start them. Workers get
//! world ranks in the order they join. The service runs for the coordinator's whole life:
//! a worker that comes back (restarted, or its coordinator restarted) joins again, and a
//! worker that joins a full cluster waits as a spare for a rank that is lost.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};
use tpserve_proto::auth::{Admission, CheckToken};
use tpserve_proto::tls::Tls;
use tpserve_proto::v1;
use tracing::{info, warn};

use crate::error::ClusterError;

/// A worker as it joined.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Joined {
    addr: String,
    id: u64,
}

#[derive(Debug, Default)]
struct JoinState {
    wanted: usize,
    /// The ranks, in joining order (a replacement takes its rank's place).
    ranks: Vec<Joined>,
    /// Workers that joined a full cluster, first come first used.
    spares: Vec<Joined>,
}

/// Who has joined: the ranks and the spares.
#[derive(Debug)]
pub struct JoinRegistry {
    state: Mutex<JoinState>,
    changed: Notify,
}

impl JoinRegistry {
    /// A registry that wants `wanted` workers.
    pub fn new(wanted: usize) -> Arc<Self> {
        Arc::new(Self { state: Mutex::new(JoinState { wanted, ..JoinState::default() }), changed: Notify::new() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JoinState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a join: the answer's message, or why it is refused.
    fn join(&self, addr: &str, id: u64) -> Result<String, Status> {
        let mut st = self.lock();
        let gathering = st.ranks.len() < st.wanted;
        if let Some(rank) = st.ranks.iter().position(|j| j.addr == addr) {
            if st.ranks[rank].id == id {
                return Ok(format!("already joined as rank {rank}"));
            }
            if gathering {
                // Two live workers that advertise one address: the cluster would talk to one
                // of them twice. Refuse the second, loudly, on both sides.
                warn!(worker = %addr, "a second worker advertises an address already joined: refused");
                return Err(Status::already_exists(format!(
                    "another worker already joined as {addr}: every worker needs its own address; give each one --advertise <its IP or DNS name>:<port>"
                )));
            }
            // The cluster was complete: this is that rank's worker started again.
            st.ranks[rank].id = id;
            info!(worker = %addr, rank, "worker joined again");
            self.changed.notify_waiters();
            return Ok(format!("joined again as rank {rank}"));
        }
        if let Some(s) = st.spares.iter_mut().find(|j| j.addr == addr) {
            s.id = id;
            return Ok("already a spare".into());
        }
        if gathering {
            st.ranks.push(Joined { addr: addr.into(), id });
            let rank = st.ranks.len() - 1;
            info!(worker = %addr, rank, "worker joined");
            self.changed.notify_waiters();
            return Ok(format!("joined as rank {rank}"));
        }
        st.spares.push(Joined { addr: addr.into(), id });
        info!(worker = %addr, "worker joined as a spare");
        self.changed.notify_waiters();
        Ok(format!("the cluster has its {} workers: joined as a spare, used if a rank is lost", st.wanted))
    }

    /// The ranks' addresses once `wanted` workers have joined, calling `on_join(rank, addr)`
    /// as each comes.
    pub async fn wait_full(&self, mut on_join: impl FnMut(usize, &str)) -> Vec<String> {
        let mut seen = 0;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let st = self.lock();
                for (rank, j) in st.ranks.iter().enumerate().skip(seen) {
                    on_join(rank, &j.addr);
                }
                seen = st.ranks.len();
                if seen >= st.wanted {
                    return st.ranks.iter().map(|j| j.addr.clone()).collect();
                }
            }
            changed.await;
        }
    }

    /// How many ranks have joined, of how many wanted.
    pub fn count(&self) -> (usize, usize) {
        let st = self.lock();
        (st.ranks.len(), st.wanted)
    }

    /// Puts the first spare in rank `rank`'s place (its worker is lost); its address, if
    /// there was a spare.
    pub fn replace_with_spare(&self, rank: usize) -> Option<String> {
        let mut st = self.lock();
        if rank >= st.ranks.len() || st.spares.is_empty() {
            return None;
        }
        let spare = st.spares.remove(0);
        info!(rank, lost = %st.ranks[rank].addr, replacement = %spare.addr, "a spare takes a lost rank's place");
        st.ranks[rank] = spare.clone();
        Some(spare.addr)
    }
}

/// The gRPC face of a [`JoinRegistry`].
struct JoinService {
    registry: Arc<JoinRegistry>,
}

#[tonic::async_trait]
impl tpserve_proto::Coordinator for JoinService {
    async fn join(&self, req: Request<v1::JoinRequest>) -> Result<Response<v1::JoinResponse>, Status> {
        let v1::JoinRequest { worker_addr: addr, worker_id } = req.into_inner();
        if addr.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
            return Err(Status::invalid_argument(format!("worker_addr {addr:?} is not host:port")));
        }
        let message = self.registry.join(&addr, worker_id)?;
        Ok(Response::new(v1::JoinResponse { accepted: true, message }))
    }
}

/// Serves the join service for `registry` on `listener`, admitting callers as `admit`
/// says, over TLS when `tls` is set, until the process ends (or the returned task is aborted).
pub fn serve_joins(
    listener: tokio::net::TcpListener,
    registry: Arc<JoinRegistry>,
    admit: Admission,
    tls: Option<Tls>,
) -> Result<tokio::task::JoinHandle<Result<(), ClusterError>>, ClusterError> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = &tls {
        let cfg = t.server().map_err(ClusterError::Plan)?;
        builder = builder.tls_config(cfg).map_err(|e| ClusterError::Plan(format!("TLS for the join service: {e}")))?;
    }
    Ok(tokio::spawn(async move {
        let service = InterceptedService::new(tpserve_proto::CoordinatorServer::new(JoinService { registry }), CheckToken::new(admit));
        builder
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .map_err(|e| ClusterError::Plan(format!("the join service failed: {e}")))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_worker_at_a_joined_address_is_refused_while_gathering_and_a_restarted_one_taken_after() {
        let r = JoinRegistry::new(2);
        assert_eq!(r.join("w0:1", 7).unwrap(), "joined as rank 0");
        assert_eq!(r.join("w0:1", 7).unwrap(), "already joined as rank 0");
        let dup = r.join("w0:1", 8).unwrap_err();
        assert_eq!(dup.code(), tonic::Code::AlreadyExists);
        assert!(dup.message().contains("--advertise"), "{}", dup.message());
        assert_eq!(r.join("w1:1", 9).unwrap(), "joined as rank 1");
        // Full: the same address with a new id is that rank's worker restarted.
        assert_eq!(r.join("w1:1", 10).unwrap(), "joined again as rank 1");
        assert!(r.join("w2:1", 11).unwrap().contains("spare"));
        assert_eq!(r.replace_with_spare(0).as_deref(), Some("w2:1"));
        assert_eq!(r.replace_with_spare(0), None);
        assert_eq!(r.count(), (2, 2));
    }
}
