//! Plain types shared by every tpserve crate: token ids, sampling parameters and the
//! sampler math. Pure: no I/O, no tensors, no async.

pub mod sampling;

pub use sampling::{SamplingParams, SamplingError};

/// A token id in the model's vocabulary.
pub type TokenId = u32;
