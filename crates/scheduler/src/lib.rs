//! `tpserve-scheduler`: what runs in each step, as a pure state machine (no I/O, no async,
//! no clocks), so every policy here is unit-tested on its own.
//!
//! - Continuous (iteration-level) batching: every step, running sequences get their next
//!   token (or their next prompt chunk) first, then waiting requests are admitted in arrival
//!   order, all under one per-step token budget; long prompts are prefilled in chunks so they
//!   never stall the running decodes for long.
//! - Paged KV cache: block tables per sequence and KV group ([`tpserve_types::kv`]), a free
//!   list per group ([`blocks::BlockPool`]); the workers hold the memory and are told which
//!   blocks each step writes. Sliding-window groups give back blocks that left the window.
//! - Prefix caching: full blocks are hashed by their tokens and everything before them; a new
//!   request whose prompt starts with cached blocks starts after them.
//! - Back-pressure and preemption: a bounded waiting queue; when blocks run out the newest
//!   running sequence is preempted (its blocks freed) and recomputed later.

pub mod blocks;
mod scheduler;

pub use scheduler::{AddError, Batch, NewRequest, ReqId, Scheduled, Scheduler, SchedulerConfig, Stats};

#[cfg(test)]
mod tests;
