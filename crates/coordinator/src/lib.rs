//! `tpserve-coordinator`: drives the workers of a cluster. It plans nothing itself (the plan
//! is `tpserve_types::plan`), does no tensor math, and never sees full logits: it merges the
//! last stage's per-slice candidates into sampled tokens.
//!
//! - [`cluster`]: connecting, loading shards with progress, fanning steps out, diagnosing a
//!   lost worker.
//! - [`engine`]: the serving loop's core: requests in, scheduler steps out, tokens sampled
//!   from the merged candidates, text and log-probabilities to each request's channel.
//! - [`eval`]: perplexity windows and statistics, prompt log-likelihoods through the engine,
//!   KL divergence.
//! - [`generate`]: a fixed batch of requests run to the end through the engine.
//! - [`join`]: the service workers started with `--join` register with.

pub mod backend;
pub mod cluster;
pub mod engine;
pub mod eval;
pub mod generate;
pub mod join;
pub mod text;

pub use backend::{Backend, StepReply};
pub use cluster::{Cluster, RemoteWorker, Timeouts};
pub use engine::{Engine, EngineConfig, Event, Logprob, Request, Summary};
pub use generate::{generate_batch, FinishReason, GenOptions, GenOutput, GenRequest, StepStats};

/// Why the cluster could not do what was asked. Each message names the rank or worker
/// address concerned and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot reach worker {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("{0}")]
    Plan(String),
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
    #[error("protocol error: {0}")]
    Protocol(String),
}
