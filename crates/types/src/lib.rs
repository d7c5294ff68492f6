//! Plain types shared by every tpserve crate: token ids, sampling parameters and the sampler
//! math ([`sampling`]), the parallelism plan ([`plan`]), the paged KV cache's layout
//! ([`kv`]), the step protocol as data ([`step`]) and devices and collectives ([`device`]). Pure: no I/O, no tensors, no async.

pub mod device;
pub mod kv;
pub mod plan;
pub mod sampling;
pub mod step;

pub use sampling::{LogitBias, SamplingError, SamplingParams};

/// A token id in the model's vocabulary.
pub type TokenId = u32;
