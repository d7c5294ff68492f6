//! `tpserve-bench`: a load tester for any OpenAI-compatible server. When requests are sent
//! ([`arrivals`]), how one streamed request is timed ([`client`]), and what a run's records
//! add up to ([`metrics`], with the meaning and names of vLLM's `bench serve` results).

pub mod arrivals;
pub mod client;
pub mod metrics;
