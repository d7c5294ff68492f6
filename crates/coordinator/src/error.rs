//! [`ClusterError`]: why the cluster could not do what was asked.

/// Why the cluster could not do what was asked. Each message names the rank or worker
/// address concerned and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A worker could not be reached, or is not one this coordinator can drive.
    #[error("cannot reach worker {addr}: {message}")]
    Connect {
        /// The worker's gRPC address as given.
        addr: String,
        /// What went wrong and what to do.
        message: String,
    },
    /// A worker refused this coordinator: no cluster token, or another one.
    #[error("worker {addr} refused this coordinator: {message}")]
    Unauthenticated {
        /// The worker's gRPC address as given.
        addr: String,
        /// The worker's reason (which token is missing or wrong).
        message: String,
    },
    /// Several workers could not be reached (each named).
    #[error("{0}")]
    Unreachable(String),
    /// The workers given do not fit the plan.
    #[error("{0}")]
    Plan(String),
    /// Some rank could not load its shard.
    #[error("loading failed: {0}")]
    Load(String),
    /// A step failed on some ranks: the cluster can no longer serve.
    #[error("{0}")]
    WorkerLost(String),
    /// The cluster failed earlier.
    #[error("the cluster cannot serve: {0}")]
    Unavailable(String),
    /// Every rank refused the request; the cluster is unharmed.
    #[error("request refused: {0}")]
    Rejected(String),
    /// A rank answered something the protocol does not allow.
    #[error("protocol error: {0}")]
    Protocol(String),
}
