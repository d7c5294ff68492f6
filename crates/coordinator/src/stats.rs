//! What steps cost: wall time, each rank's compute and communication time, and the bytes
//! of the control plane, summed over a run by the [`crate::Engine`].

use serde::Serialize;

/// One rank's share of the steps' time.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RankTime {
    /// World rank.
    pub rank: usize,
    /// Time the rank spent on its steps.
    pub compute_ms: f64,
    /// Part of `compute_ms` spent in collectives (waiting for peers included).
    pub comm_ms: f64,
}

/// What the steps of a run cost.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepStats {
    /// Steps run.
    pub steps: usize,
    /// Wall time of the steps as the coordinator saw them (network included).
    pub step_ms: f64,
    /// Per rank, in rank order.
    pub ranks: Vec<RankTime>,
    /// Encoded step messages sent to all ranks.
    pub request_bytes: usize,
    /// Encoded answers received from all ranks.
    pub response_bytes: usize,
}

impl StepStats {
    /// Adds one step that took `took_ms` and got `reply`.
    pub(crate) fn add(&mut self, reply: &crate::StepReply, took_ms: f64) {
        self.steps += 1;
        self.step_ms += took_ms;
        self.request_bytes += reply.request_bytes;
        self.response_bytes += reply.response_bytes;
        for o in &reply.outputs {
            if self.ranks.len() <= o.rank {
                self.ranks.resize_with(o.rank + 1, RankTime::default);
            }
            let r = &mut self.ranks[o.rank];
            r.rank = o.rank;
            r.compute_ms += o.compute_us as f64 / 1e3;
            r.comm_ms += o.comm_us as f64 / 1e3;
        }
    }
}
