//! Shared helpers of the model crate's integration tests.
#![allow(dead_code, unused_imports)]

pub(crate) use tpserve_fetch::testing::{default_model, reference as read_jsonl};

pub(crate) fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

pub(crate) fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
}
