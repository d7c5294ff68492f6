//! `tpserve-coordinator`: drives the workers of a cluster. It plans nothing itself (the plan
//! is `tpserve_types::plan`), does no tensor math (it links the tokenizer, never the model),
//! and never sees full logits: it merges the last stage's per-slice candidates into sampled
//! tokens.
//!
//! - [`request`]: the one way in for a request: every front end's values checked against
//!   the model's limits into an engine [`Request`].
//! - [`engine`]: the serving loop's core: requests in, scheduler steps out, tokens sampled
//!   from the merged candidates, text and log-probabilities to each request's channel.
//! - [`backend`]: what the engine steps (a [`Cluster`], or a shard in the caller's process).
//! - [`cluster`]: connecting, loading shards with progress, fanning steps out, diagnosing a
//!   lost worker.
//! - [`join`]: the service workers started with `--join` register with.
//! - [`generate`]: a fixed batch of requests run to the end through the engine.
//! - [`eval`]: perplexity windows and statistics, prompt log-likelihoods through the engine,
//!   KL divergence.
//! - [`metrics`]: what every Prometheus metric the engine records means.
//! - [`stats`]: what steps cost; [`text`]: streaming text with stop strings; [`error`].

pub mod backend;
pub mod cluster;
pub mod engine;
pub mod error;
pub mod eval;
pub mod generate;
pub mod join;
pub mod metrics;
pub mod request;
pub mod stats;
pub mod text;

pub use backend::{Backend, Pending, StepReply};
pub use cluster::{Cluster, ClusterSpec, LoadProgress, RemoteWorker, Timeouts};
pub use engine::{Engine, EngineConfig, Event, FinishReason, Logprob, Request, Summary};
pub use error::ClusterError;
pub use generate::{generate_batch, GenOptions, GenOutput, Timings};
pub use join::JoinRegistry;
pub use request::{InvalidParam, Limits, OverContext, RequestParams, MAX_LOGIT_BIAS_ENTRIES};
pub use stats::{RankTime, StepStats};
pub use tpserve_proto::auth::{Admission, ClusterToken};
pub use tpserve_proto::tls::Tls;
