//! What the engine steps: a cluster of remote workers, or a shard in this process. Either
//! way a step goes to every rank and comes back as one answer per rank.

use std::future::Future;

use tpserve_types::kv::KvLayout;
use tpserve_types::step::{StepOutput, StepPlan};

use crate::error::ClusterError;

/// Every rank's answer to one step, with what it cost on the wire.
#[derive(Debug, Clone, Default)]
pub struct StepReply {
    /// One per rank, in rank order.
    pub outputs: Vec<StepOutput>,
    /// Encoded bytes of the step requests sent, summed over the ranks (0 in process).
    pub request_bytes: usize,
    /// Encoded bytes of the answers received, summed over the ranks (0 in process).
    pub response_bytes: usize,
}

/// Runs steps on every rank of a model.
pub trait Backend: Send {
    /// Sends `plan` to every rank and returns every rank's answer.
    fn step(&mut self, plan: &StepPlan) -> impl Future<Output = Result<StepReply, ClusterError>> + Send;
    /// The model's context length (positions per sequence).
    fn context_len(&self) -> usize;
    /// The KV cache the ranks were loaded with.
    fn kv_layout(&self) -> &KvLayout;
    /// Tries once to bring a backend whose step failed back (every rank reloaded, no
    /// sequence kept); Ok once it can step (at once if it had not failed). A backend that
    /// keeps no failed state (a shard in this process reports each step's error itself)
    /// has nothing to do.
    fn recover(&mut self) -> impl Future<Output = Result<(), ClusterError>> + Send {
        async { Ok(()) }
    }
}

impl<B: Backend> Backend for &mut B {
    fn step(&mut self, plan: &StepPlan) -> impl Future<Output = Result<StepReply, ClusterError>> + Send {
        (**self).step(plan)
    }

    fn context_len(&self) -> usize {
        (**self).context_len()
    }

    fn kv_layout(&self) -> &KvLayout {
        (**self).kv_layout()
    }

    fn recover(&mut self) -> impl Future<Output = Result<(), ClusterError>> + Send {
        (**self).recover()
    }
}
