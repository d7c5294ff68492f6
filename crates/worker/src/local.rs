//! [`LocalShard`]: a rank's shard on this process's compute pool, and the one way a step
//! reaches it: the gRPC service steps it for the coordinator, and the binary steps it in
//! process at tp = pp = 1 (`tpserve generate`, `tpserve eval`), with no network at all.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tpserve_comm::Local;
use tpserve_gguf::Gguf;
use tpserve_model::device::DeviceOps;
use tpserve_model::model::{model_shape, ModelError};
use tpserve_types::kv::KvLayout;
use tpserve_types::plan::Plan;
use tpserve_types::step::{StepOutput, StepPlan};
use tracing::{debug, info_span, warn};

use crate::shard::{Shard, StepError};

/// The shard this process holds (if any) and the threads it computes on. Cheap to clone:
/// clones share the shard and the pool.
#[derive(Clone)]
pub struct LocalShard {
    /// Compute threads for forward passes (only this pool's threads compute).
    pool: Arc<rayon::ThreadPool>,
    /// The loaded shard; steps run one at a time.
    shard: Arc<Mutex<Option<Shard>>>,
}

impl LocalShard {
    /// No shard yet, computing on `pool` once one is loaded.
    pub fn new(pool: Arc<rayon::ThreadPool>) -> Self {
        Self { pool, shard: Arc::new(Mutex::new(None)) }
    }

    /// The whole model in `g` as the single rank of tp = pp = 1 on `device`, with the KV
    /// cache `kv`, loaded on `pool` and its pages read in (as a worker does before its first
    /// step).
    pub fn load_whole(device: &DeviceOps, g: &Gguf, kv: &KvLayout, pool: Arc<rayon::ThreadPool>) -> Result<Self, ModelError> {
        let plan = Plan::new(model_shape(g)?, 1, 1).map_err(|e| ModelError::Plan(e.to_string()))?;
        let shard = pool.install(|| Shard::load(device, g, &plan.shard(0), Arc::new(Local), None, kv))?;
        pool.install(|| shard.model().prefault(&mut |_, _| {}));
        let local = Self::new(pool);
        local.set(Some(shard));
        Ok(local)
    }

    /// The compute pool.
    pub fn pool(&self) -> &rayon::ThreadPool {
        &self.pool
    }

    /// The shard, locked; a poisoned lock is taken over. A step that fails part-way with an
    /// error marks the shard broken itself; a step that panics on the compute pool aborts
    /// the process (rayon's default for spawned jobs), so it never leaves a half-updated
    /// shard behind this lock.
    pub fn lock(&self) -> MutexGuard<'_, Option<Shard>> {
        self.shard.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shard slot if no step holds it now (`None` while one runs).
    pub fn try_lock(&self) -> Option<MutexGuard<'_, Option<Shard>>> {
        match self.shard.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Replaces the shard (None drops it: its memory and its collective go).
    pub fn set(&self, shard: Option<Shard>) {
        *self.lock() = shard;
    }

    /// Whether a shard is loaded and can step, and why not; `None` while a step holds the
    /// shard (the worker is alive and busy, so it counts as ready).
    pub fn health(&self) -> Option<Result<(), String>> {
        let g = self.shard.try_lock().ok()?;
        Some(match g.as_ref() {
            None => Err("no shard is loaded".to_string()),
            Some(s) => s.broken().map_or(Ok(()), |why| Err(why.to_string())),
        })
    }

    /// Runs `plan` on the compute pool: the step runs on a compute thread itself and wakes
    /// the caller when done, one thread hand-off each way (each wake of an idle core costs
    /// tens of microseconds or more on a virtual machine, and a decode step is ~25 ms).
    pub async fn step(&self, plan: StepPlan) -> Result<StepOutput, StepError> {
        let t_enter = Instant::now();
        let shard = self.shard.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pool.spawn(move || {
            let queued_us = t_enter.elapsed().as_micros() as u64;
            let mut guard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let out = match guard.as_mut() {
                None => Err(StepError::NotLoaded),
                Some(shard) => {
                    let span = info_span!("step", rank = shard.shard().rank, step = plan.step, seqs = plan.seqs.len());
                    let _enter = span.enter();
                    let out = shard.step(&plan);
                    match &out {
                        Ok(o) => debug!(queued_us, compute_us = o.compute_us, comm_us = o.comm_us, "step done"),
                        Err(e) => warn!(error = %e, "step failed"),
                    }
                    out
                }
            };
            let _ = tx.send(out);
        });
        let out = rx.await.map_err(|_| StepError::Panicked)?;
        debug!(handler_us = t_enter.elapsed().as_micros() as u64, "step answered");
        out
    }
}
