//! Shared helpers of the model crate's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The default model, fetched into the cache on first use as `tpserve model fetch` does.
/// With `TPSERVE_SKIP_MODEL=1` (no network, no pip) the tests that need it are skipped.
pub fn default_model() -> Option<PathBuf> {
    if std::env::var("TPSERVE_SKIP_MODEL").as_deref() == Ok("1") {
        eprintln!("skipping: TPSERVE_SKIP_MODEL=1");
        return None;
    }
    // Tests of one binary run on parallel threads: fetch once, not once per test.
    static MODEL: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    match MODEL.get_or_init(|| tpserve_model::fetch::fetch_default(false).map_err(|e| e.to_string())) {
        Ok(p) => Some(p.clone()),
        Err(e) => panic!("the default model is needed by this test and could not be fetched: {e} (set TPSERVE_SKIP_MODEL=1 to skip such tests)"),
    }
}

/// `$TPSERVE_SHARED_DATA`, or `../shared/data` beside the workspace.
pub fn shared_data() -> PathBuf {
    std::env::var_os("TPSERVE_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"))
}

pub fn read_jsonl(name: &str) -> Vec<serde_json::Value> {
    let p = shared_data().join("reference").join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

pub fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
}
