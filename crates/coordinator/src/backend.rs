//! What the engine steps: a cluster of remote workers, or a shard in this process. Either
//! way a step goes to every rank and comes back as one answer per rank.

use std::future::Future;
use std::pin::Pin;

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

/// A step sent to every rank whose answers are still to come: it owns what it needs, so
/// the engine can hold several while it forms the next.
pub type Pending = Pin<Box<dyn Future<Output = Result<StepReply, ClusterError>> + Send + 'static>>;

/// Runs steps on every rank of a model.
pub trait Backend: Send {
    /// Sends `plan` to every rank and returns every rank's answer.
    fn step(&mut self, plan: &StepPlan) -> impl Future<Output = Result<StepReply, ClusterError>> + Send;
    /// How many steps may be in flight at once: the pipeline's stages, so that every stage
    /// computes a batch of its own while the later ones finish the earlier batches (1: one
    /// step at a time, through [`Backend::step`]).
    fn pipeline_depth(&self) -> usize {
        1
    }
    /// Sends `plan` to every rank without waiting for the steps sent before it to finish:
    /// each rank still runs its steps in the order they were submitted. `None` where the
    /// backend cannot (then [`Backend::pipeline_depth`] is 1). The engine passes every error
    /// of the returned future to [`Backend::step_failed`].
    fn submit(&mut self, plan: &StepPlan) -> Option<Pending> {
        let _ = plan;
        None
    }
    /// A submitted step failed with `e`: a backend that keeps a failed state takes it on
    /// here, as [`Backend::step`] does itself.
    fn step_failed(&mut self, e: &ClusterError) {
        let _ = e;
    }
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

    fn pipeline_depth(&self) -> usize {
        (**self).pipeline_depth()
    }

    fn submit(&mut self, plan: &StepPlan) -> Option<Pending> {
        (**self).submit(plan)
    }

    fn step_failed(&mut self, e: &ClusterError) {
        (**self).step_failed(e)
    }
}
