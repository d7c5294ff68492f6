//! Plain types shared by every tpserve crate: token ids, sampling parameters, the sampler
//! math and the parallelism plan. Pure: no I/O, no tensors, no async.

pub mod kv;
pub mod plan;
pub mod sampling;
pub mod step;

pub use sampling::{SamplingError, SamplingParams};

/// A token id in the model's vocabulary.
pub type TokenId = u32;
